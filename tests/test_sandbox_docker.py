"""The Docker backend: the container's settings, then the real image in a real engine
(built by scripts/build_sandbox_image.sh from this checkout): isolation inside the
container, stateless runs, sessions, start failures, and tir and synthesize runs with
``sandbox.backend = docker``. The hostile suite runs against the container too
(tests/test_sandbox_hostile.py, param ``docker``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from mathmill.sandbox import SandboxUnavailable, session
from mathmill.sandbox.docker import DockerSandbox, container_options, seccomp_profile

ROOT = Path(__file__).resolve().parents[1]


def test_container_options_lock_the_container_down() -> None:
    opts = container_options("/tmp/socks", memory_mb=2048, pids=256, workers=4, cpus=1.5)
    host = opts["host_config"]
    assert host["network_mode"] == "none"
    assert host["read_only"] is True
    assert host["cap_drop"] == ["ALL"]
    assert host["security_opt"][0] == "no-new-privileges"
    assert host["security_opt"][1] == f"seccomp={seccomp_profile()}"
    assert host["pids_limit"] == 256 and host["mem_limit"] == "2048m"
    assert host["memswap_limit"] == "2048m"  # no swap beyond the memory limit
    assert host["nano_cpus"] == 1_500_000_000
    assert host["binds"] == {"/tmp/socks": {"bind": "/run/mathmill", "mode": "rw"}}
    assert opts["user"] == "10001:10001"
    assert opts["environment"] == {}  # nothing of the caller's environment goes in
    assert opts["command"][:7] == [
        "mathmill",
        "sandbox",
        "serve",
        "--uds",
        "/run/mathmill/sandbox.sock",
        "--workers",
        "4",
    ]


def test_seccomp_profile_denies_the_dangerous_calls_and_allows_namespaces() -> None:
    profile = json.loads(seccomp_profile())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {name for rule in profile["syscalls"] for name in rule["names"]}
    assert {"ptrace", "bpf", "keyctl", "init_module", "io_uring_setup", "setns"} <= denied
    assert {"unshare", "kexec_load", "perf_event_open", "process_vm_readv"} <= denied
    # What the server inside needs to isolate each job stays allowed.
    assert not denied & {"clone", "clone3", "mount", "landlock_create_ruleset", "prctl"}


def test_compose_file_matches_the_backend() -> None:
    compose = yaml.safe_load((ROOT / "sandbox_image" / "compose.yaml").read_text())
    service = compose["services"]["sandbox"]
    opts = container_options("/x", memory_mb=4096, pids=512, workers=2)
    host = opts["host_config"]
    assert service["network_mode"] == host["network_mode"]
    assert service["read_only"] is host["read_only"]
    assert service["cap_drop"] == host["cap_drop"] and service["user"] == opts["user"]
    assert service["pids_limit"] == host["pids_limit"] and service["mem_limit"] == "4g"
    assert "no-new-privileges:true" in service["security_opt"]
    assert "systempaths=unconfined" in service["security_opt"]
    seccomp = next(o for o in service["security_opt"] if o.startswith("seccomp:"))
    profile = (ROOT / "sandbox_image" / seccomp.split(":", 1)[1]).resolve()
    assert profile.read_text() == seccomp_profile()
    assert service["command"] == opts["command"]
    assert service["image"].startswith("mathmill-sandbox:")
    dockerfile = (ROOT / "sandbox_image" / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile
    assert '"--uds", "/run/mathmill/sandbox.sock"' in dockerfile


def test_image_requirements_are_the_project_pins() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in project["dependencies"] if "==" in d}
    lines = (ROOT / "sandbox_image" / "requirements.txt").read_text().splitlines()
    wanted = dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    for name, version in wanted.items():
        if name in pins:
            assert pins[name] == version, name
    assert {"numpy", "sympy", "scipy", "pandas", "fastapi", "uvicorn"} <= set(wanted)


# -- the real image in a real engine -----------------------------------------------------


def inspect(container_id: str) -> dict[str, Any]:
    import docker

    attrs: dict[str, Any] = docker.from_env().api.inspect_container(container_id)
    return attrs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_container_runs_code_isolated_and_is_removed(docker_image: str) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
        async with DockerSandbox(docker_image, workers=2, pids=256, memory_mb=2048) as box:
            attrs = inspect(box.container.id)
            health = await box.health()
            results = [
                await box.execute("import sympy; print(sympy.factorint(2**64 + 1))"),
                await box.execute("import os; print(sorted(os.environ))"),
                await box.execute("import socket; socket.create_connection(('1.1.1.1', 53), 2)"),
                await box.execute("open('/opt/mathmill/pwned', 'w')"),
            ]
            async with session(box) as sid:
                await box.run_in_session(sid, "import sympy\nx = sympy.Symbol('x')")
                results.append(await box.run_in_session(sid, "sympy.solve(x**2 - 4, x)"))
            assert await box.start() is box and box.container.id == attrs["Id"]  # no second
            return attrs, health, results

    attrs, health, results = asyncio.run(scenario())
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and host["PidsLimit"] == 256
    assert host["Memory"] == 2048 * 2**20 and host["MaskedPaths"] == []
    assert attrs["Config"]["User"] == "10001:10001"
    assert not any(e.startswith(("OPENAI", "AWS", "HF_")) for e in attrs["Config"]["Env"])
    layers = health["layers"]
    assert health["backend"] == "docker" and layers["uid"] == 10001
    for layer in ("namespaces", "proc", "tmpfs", "rlimits", "process_limit", "isolated"):
        assert layers[layer] is True, layer
    assert layers["landlock_abi"] >= 1 and layers["unsafe"] is False
    factor, env, net, write, turn = results
    assert (factor.status, factor.stdout) == ("ok", "{274177: 1, 67280421310721: 1}\n")
    assert factor.backend == "docker"
    assert "OPENAI_API_KEY" not in env.stdout and env.status == "ok"
    assert net.status == "error" and write.status == "error"
    assert turn.stdout.strip() == "[-2, 2]" and "x" in turn.state.summary
    import docker

    left = docker.from_env().containers.list(all=True, filters={"label": "mathmill.sandbox"})
    assert attrs["Id"] not in {c.id for c in left}  # stopped and removed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_container_that_cannot_start_says_why(docker_image: str) -> None:
    async def start(image: str) -> None:
        async with DockerSandbox(image, start_timeout_s=60):
            pass

    with pytest.raises(SandboxUnavailable, match="cannot start mathmill-sandbox:no-such-tag"):
        asyncio.run(start("mathmill-sandbox:no-such-tag"))
    # The server inside refuses a bad option and exits: its log is in the error.
    bad = DockerSandbox(docker_image, workers=0, start_timeout_s=60)
    with pytest.raises(SandboxUnavailable, match="exited with code") as info:
        asyncio.run(bad.start())
    assert "workers" in str(info.value)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_pythonformer_client_runs_a_session_in_the_container(docker_image: str) -> None:
    import httpx

    from tests.sandbox_support import pythonformer_session_script

    async def scenario() -> None:
        async with DockerSandbox(docker_image, workers=1, timeout_s=2.0) as box:
            transport = httpx.HTTPTransport(uds=box.socket_path)
            with httpx.Client(base_url="http://sandbox", transport=transport, timeout=30) as c:
                await asyncio.to_thread(pythonformer_session_script, c)

    asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_containers_of_a_killed_orchestrator_are_removed_by_the_next_start(
    docker_image: str, tmp_path: Path
) -> None:
    import docker

    script = tmp_path / "hold.py"
    script.write_text(
        "import asyncio, sys\n"
        "from mathmill.sandbox.docker import DockerSandbox\n"
        "async def main():\n"
        f"    box = await DockerSandbox({docker_image!r}, workers=1).start()\n"
        "    print(box.container.id, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        orphan = proc.stdout.readline().strip()
    finally:
        proc.kill()  # SIGKILL: no chance to stop its container
        proc.wait()
    engine = docker.from_env()
    assert engine.containers.get(orphan).status == "running"

    async def start_another() -> None:
        async with DockerSandbox(docker_image, workers=1) as box:
            assert (await box.execute("print(1)")).stdout == "1\n"

    asyncio.run(start_another())
    left = {c.id for c in engine.containers.list(all=True, filters={"label": "mathmill.sandbox"})}
    assert orphan not in left


# -- pipelines with sandbox.backend = docker ---------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tir_run_in_two_containers_matches_the_local_one(
    docker_image: str, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.flows.tir import tir
    from mathmill.llm.fake_server import FakeOpenAIServer
    from tests.test_tir import handler, params

    outputs = {}
    with FakeOpenAIServer(handler) as fake:
        for backend in ("local", "docker"):
            sandbox = {"timeout_s": 1.0, "workers": 1, "max_sessions": 4, "backend": backend}
            if backend == "docker":  # two containers: sessions spread, each pinned
                sandbox |= {"image": docker_image, "replicas": 2}
            tmp = tmp_path / backend
            tmp.mkdir()
            asyncio.run(tir(params=params(fake.base_url, tmp, sandbox=sandbox)))
            rows = [json.loads(line) for line in (tmp / "run" / "sharegpt.jsonl").open()]
            outputs[backend] = {r["id"]: r["conversations"] for r in rows}
    assert outputs["docker"] == outputs["local"]
    assert len(outputs["docker"]) >= 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_synthesize_run_in_the_container_verifies_as_the_local_sandbox_does(
    docker_image: str, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.flows.synthesize import synthesize
    from mathmill.llm.fake_server import FakeOpenAIServer
    from mathmill.records import SolutionRow
    from mathmill.storage import RunStore
    from tests.synth_world import SynthWorld
    from tests.test_synthesize import world_config

    world = SynthWorld(kinds=("ok", "fix", "crash", "leak", "spin"))
    with FakeOpenAIServer(world) as fake:
        cfg = world_config(
            fake.base_url,
            str(tmp_path / "run"),
            topics=5,
            sandbox={"backend": "docker", "image": docker_image, "timeout_s": 1.0},
        )
        result = asyncio.run(synthesize(params=cfg))
    store = RunStore(str(tmp_path / "run"))
    rows = [
        *store.dataset("verified").read_all(SolutionRow),
        *store.dataset("unverified").read_all(SolutionRow),
    ]
    outcome = Counter((r.problem.split("]")[0][1:], r.status) for r in rows)
    assert result.verified == 8  # ok and fix, two problems each, long and short CoT
    assert outcome == {
        ("ok", "verified"): 4,
        ("fix", "verified"): 4,
        ("crash", "error"): 4,
        ("leak", "leak"): 4,
        ("spin", "timeout"): 4,
    }
