"""The Docker backend's container settings (no Docker engine runs on CI machines)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mathmill.sandbox.docker import container_options

ROOT = Path(__file__).resolve().parents[1]


def test_container_options_lock_the_container_down() -> None:
    opts = container_options("/tmp/socks", memory_mb=2048, pids=256, workers=4)
    assert opts["network_mode"] == "none"
    assert opts["read_only"] is True
    assert opts["cap_drop"] == ["ALL"]
    assert opts["security_opt"] == ["no-new-privileges"]
    assert opts["user"] == "10001:10001"
    assert opts["pids_limit"] == 256 and opts["mem_limit"] == "2048m"
    assert opts["environment"] == {}  # nothing of the caller's environment goes in
    assert opts["volumes"] == {"/tmp/socks": {"bind": "/run/mathmill", "mode": "rw"}}
    assert opts["command"] == [
        "mathmill",
        "sandbox",
        "serve",
        "--uds",
        "/run/mathmill/sandbox.sock",
        "--workers",
        "4",
    ]


def test_compose_file_matches_the_backend() -> None:
    compose = yaml.safe_load((ROOT / "sandbox_image" / "compose.yaml").read_text())
    service = compose["services"]["sandbox"]
    assert service["network_mode"] == "none" and service["read_only"] is True
    assert service["cap_drop"] == ["ALL"] and service["user"] == "10001:10001"
    assert "no-new-privileges:true" in service["security_opt"]
    dockerfile = (ROOT / "sandbox_image" / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile
    assert '"--uds", "/run/mathmill/sandbox.sock"' in dockerfile
