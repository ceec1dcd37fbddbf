"""The sandbox HTTP server's API (the Pythonformer REPL API), over TCP and a Unix socket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mathmill.sandbox import HTTPSandbox, Limits, LocalSandbox, SandboxUnavailable
from tests.sandbox_support import sandbox_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url() -> object:
    with sandbox_server([sys.executable], {"PATH": "/usr/bin:/bin"}, timeout_s=2) as base:
        yield base


def test_rest_api_round_trip(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        health = http.get("/health").json()
        assert health["ok"] and health["layers"]["isolated"]
        r = http.post("/execute", json={"code": "print(sum(range(10)))"}).json()
        assert r["status"] == "ok" and r["stdout"] == "45\n"
        assert set(r) >= {
            "stdout_truncated",
            "stderr_truncated",
            "exit_code",
            "wall_ms",
            "cpu_ms",
            "peak_memory_kb",
        }
        t = http.post("/execute", json={"code": "while True: pass", "timeout_s": 0.5}).json()
        assert t["status"] == "timeout"
        sid = http.post("/session/create").json()["session_id"]
        turn = http.post(
            f"/session/{sid}/execute", json={"code": "import sympy\nx = sympy.Symbol('x')"}
        ).json()
        assert turn["status"] == "ok" and turn["state"]["summary"] == "imports: sympy | vars: x=x"
        state = http.get(f"/session/{sid}/state").json()
        assert state["imports"] == ["sympy"] and state["variables"][0]["type"] == "Symbol"
        assert http.post(f"/session/{sid}/reset").json() == {"session_id": sid}
        assert http.get(f"/session/{sid}/state").json()["summary"] == "(empty)"
        assert http.delete(f"/session/{sid}").json() == {"deleted": sid}
        missing = http.post(f"/session/{sid}/execute", json={"code": "1"})
        assert missing.status_code == 404
        bad = http.post("/execute", json={"cod": "1"})
        assert bad.status_code == 422
        too_long = http.post("/execute", json={"code": "1", "timeout_s": -1})
        assert too_long.status_code == 422


async def test_http_client_backend(base_url: str) -> None:
    async with HTTPSandbox(base_url) as sandbox:
        r = await sandbox.execute(
            "import numpy as np\nprint(np.arange(4).sum())", Limits(timeout_s=5)
        )
        assert r.stdout == "6\n"
        sid = await sandbox.create_session()
        await sandbox.run_in_session(sid, "a = 41")
        assert (await sandbox.run_in_session(sid, "print(a + 1)")).stdout == "42\n"
        await sandbox.delete_session(sid)


async def test_unix_socket_server(tmp_path: Path) -> None:
    sock = tmp_path / "sandbox.sock"
    proc = subprocess.Popen(  # noqa: ASYNC220 (a server process that outlives the call)
        [
            sys.executable,
            "-m",
            "mathmill",
            "sandbox",
            "serve",
            "--uds",
            str(sock),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with HTTPSandbox(uds=str(sock)) as sandbox:
            deadline = time.monotonic() + 120
            while True:
                try:
                    health = await sandbox.health()
                    break
                except SandboxUnavailable:
                    assert time.monotonic() < deadline and proc.poll() is None
                    await asyncio.sleep(0.2)
            assert health["workers"] == 1
            assert (await sandbox.execute("print('via uds')")).stdout == "via uds\n"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert b"isolation layers" in err  # the server's log names them


async def test_dead_server_is_a_clear_error() -> None:
    async with HTTPSandbox("http://127.0.0.1:9") as sandbox:
        with pytest.raises(SandboxUnavailable, match=r"127\.0\.0\.1:9"):
            await sandbox.execute("print(1)")


async def test_rlimits_only_mode_refuses_without_opt_in() -> None:
    with pytest.raises(SandboxUnavailable, match="refusing untrusted code"):
        await LocalSandbox(workers=1, use_namespaces=False).start()
    async with LocalSandbox(workers=1, use_namespaces=False, allow_unsafe=True) as sandbox:
        health = await sandbox.health()
        assert health["layers"]["unsafe"] and not health["layers"]["namespaces"]
        r = await sandbox.execute("print('runs, limited by rlimits only')")
        assert r.status == "ok"
        r = await sandbox.execute("x = bytearray(8 * 1024**3)")
        assert r.status == "memory"
