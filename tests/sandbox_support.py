"""Helpers for sandbox tests: start the HTTP server, as an unprivileged user if we are root;
a Pythonformer REPL client and a session script to point at any such server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import mathmill

REPO = Path(mathmill.__file__).resolve().parents[1]
NOBODY = 65534
_IMPORTS = (
    "import mathmill.sandbox.http_server, numpy, sympy, scipy, pandas, fastapi, uvicorn, typer"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unprivileged_command() -> tuple[list[str], dict[str, str]] | str:
    """How to run Python as an unprivileged user here, or why it is not possible.

    As root, the server is started as ``nobody`` with ``setpriv``. The interpreter must
    be readable by nobody: pyenv's under /root is not, so Debian's python3.11 runs
    with this checkout and the venv's site-packages on PYTHONPATH (same CPython ABI),
    the checkout bind-mounted at a public path when its own path is private.
    """
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    if os.geteuid() != 0:
        return [sys.executable], env
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "setpriv is not installed"
    # setpriv keeps capabilities across the uid change unless told to drop them, and
    # checks the program it execs with its own (root) credentials: exec through env so
    # that the interpreter is reached as nobody would reach it.
    drop = [
        setpriv,
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "/usr/bin/env",
    ]
    site = sysconfig.get_paths()["purelib"]
    candidates: list[tuple[list[str], dict[str, str]]] = [
        ([*drop, sys.executable], {}),
        ([*drop, "/usr/bin/python3.11"], {"PYTHONPATH": f"{REPO}:{site}"}),
    ]
    # A checkout under a private directory (mktemp makes them 0700) is out of nobody's
    # reach: bind-mount it at a public path in a private mount namespace first.
    unshare = shutil.which("unshare")
    if unshare and Path(site).is_relative_to(REPO):
        public = Path(tempfile.gettempdir()) / f"mathmill-checkout-{os.getuid()}"
        public.mkdir(exist_ok=True)
        public.chmod(0o755)
        bind = [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount --bind "$0" {public} && exec "$@"',
            str(REPO),
        ]
        site_there = public / Path(site).relative_to(REPO)
        candidates.append(
            ([*bind, *drop, "/usr/bin/python3.11"], {"PYTHONPATH": f"{public}:{site_there}"})
        )
    for command, extra in candidates:
        if not os.path.exists(command[-1]):
            continue
        probe = subprocess.run(
            [*command, "-c", _IMPORTS], env={**env, **extra}, capture_output=True, timeout=120
        )
        if probe.returncode == 0:
            return command, {**env, **extra}
    return "no Python interpreter with mathmill is readable by an unprivileged user here"


@contextmanager
def sandbox_server(
    command: list[str], env: dict[str, str], *, timeout_s: float = 3.0, uds: Path | None = None
) -> Iterator[str]:
    """Run ``mathmill sandbox serve`` on a free port, or on the Unix socket ``uds``;
    yields its base URL (``http://sandbox`` with ``uds``: connect through the socket).
    """
    if uds is None:
        base = f"http://127.0.0.1:{free_port()}"
        listen = ["--port", base.rpartition(":")[2]]
    else:
        base, listen = "http://sandbox", ["--uds", str(uds)]
    proc = subprocess.Popen(
        [
            *command,
            "-m",
            "mathmill",
            "sandbox",
            "serve",
            *listen,
            "--workers",
            "2",
            "--timeout",
            str(timeout_s),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd="/",
    )
    transport = httpx.HTTPTransport(uds=str(uds)) if uds else None
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=base, transport=transport, timeout=5) as probe:
            while True:
                if proc.poll() is not None:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    raise RuntimeError(f"sandbox server exited: {out[-2000:]}")
                try:
                    probe.get("/health").raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def processes_named(name: str) -> list[int]:
    """Host pids whose comm or cmdline mentions ``name``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if name in comm or name in cmdline:
            found.append(int(entry))
    return found


# A Pythonformer REPL client, written only from that server's API (no mathmill
# imports): marketagents-ai/MarketDataGenie, datagenie/pythonformer/python_server/.


@dataclass
class PythonformerTurn:
    """What a Pythonformer client reads from an execute answer."""

    success: bool
    output: str
    error: str | None
    truncated: bool
    execution_time_ms: int
    state: dict[str, Any] = field(default_factory=dict)
    state_formatted: str = "(empty state)"

    @classmethod
    def parse(cls, data: dict[str, Any]) -> PythonformerTurn:
        """Strict: a missing field is a KeyError, a wrong type an AssertionError."""
        turn = cls(
            success=data["success"],
            output=data["output"],
            error=data["error"],
            truncated=data.get("truncated", False),
            execution_time_ms=data["execution_time_ms"],
            state=data.get("state", {}),
            state_formatted=data.get("state_formatted", "(empty state)"),
        )
        assert isinstance(turn.success, bool) and isinstance(turn.output, str)
        assert turn.error is None or isinstance(turn.error, str)
        assert isinstance(turn.execution_time_ms, int) and turn.execution_time_ms >= 0
        return turn


class PythonformerClient:
    """The Pythonformer REPL client's calls, over a given ``httpx.Client`` (its base URL
    and transport pick the server: TCP, a Unix socket, a container's socket).
    """

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.session_id: str | None = None

    def health_check(self) -> bool:
        return self.http.get("/health").status_code == 200

    def create_session(self) -> str:
        body = {"max_output_chars": 8192, "max_iterations": 30, "enable_bash": False}
        response = self.http.post("/session/create", json=body)
        response.raise_for_status()
        self.session_id = str(response.json()["session_id"])
        return self.session_id

    def execute(self, code: str) -> PythonformerTurn:
        response = self.http.post(f"/session/{self.session_id}/execute", json={"code": code})
        response.raise_for_status()
        return PythonformerTurn.parse(response.json())

    def get_state(self) -> dict[str, Any]:
        response = self.http.get(f"/session/{self.session_id}/state")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def reset_session(self) -> None:
        self.http.post(f"/session/{self.session_id}/reset").raise_for_status()

    def delete_session(self) -> None:
        self.http.delete(f"/session/{self.session_id}").raise_for_status()

    def execute_stateless(self, code: str) -> PythonformerTurn:
        response = self.http.post("/execute", json={"code": code})
        response.raise_for_status()
        return PythonformerTurn.parse(response.json())


def pythonformer_session_script(http: httpx.Client) -> None:
    """A multi-turn Pythonformer session against the server behind ``http`` (whose
    default timeout must be well under a minute): every answer read as that client
    reads it.
    """
    client = PythonformerClient(http)
    assert client.health_check()
    assert http.get("/health").json()["status"] == "healthy"
    client.create_session()

    turn = client.execute("import sympy\nx = sympy.Symbol('x')")
    assert turn.success and turn.error is None and turn.output == ""
    assert turn.state["modules"] == ["sympy"]
    assert turn.state["variables"] == {"x": {"type": "Symbol", "value": "x"}}
    assert turn.state["functions"] == {} and turn.state["classes"] == {}
    assert turn.state_formatted == "imports: sympy | vars: x=x"

    turn = client.execute("result = sympy.solve(x**2 - 4, x)\nprint('Solutions:', result)")
    assert turn.success and turn.output == "Solutions: [-2, 2]\n" and not turn.truncated
    assert turn.state["variables"]["result"] == {"type": "list", "len": 2}
    assert turn.state_formatted == "imports: sympy | vars: x=x, result: list[2]"

    turn = client.execute("def square(n):\n    return n * n\nsquare(3)")
    assert turn.success and turn.output == "9\n"
    assert turn.state["functions"] == {"square": "def square(n)"}

    turn = client.execute("y = 1 / 0")
    assert not turn.success and turn.error == "ZeroDivisionError: division by zero"
    assert "[error]: ZeroDivisionError: division by zero" in turn.output
    assert "Traceback (most recent call last):" in turn.output
    assert "y" not in turn.state["variables"] and "result" in turn.state["variables"]

    turn = client.execute("while True:\n    pass")
    assert not turn.success and turn.error is not None
    assert turn.error.startswith("Execution timed out after ")
    assert "result" in turn.state["variables"]  # the timed-out turn left the state alone

    turn = client.execute("print(square(len(result)))")
    assert turn.success and turn.output == "4\n"

    state = client.get_state()
    assert state["session_id"] == client.session_id
    assert set(state["state"]["variables"]) == {"x", "result"}
    assert state["state_formatted"] == (
        "imports: sympy | functions: def square(n) | vars: x=x, result: list[2]"
    )

    client.reset_session()
    state = client.get_state()
    assert state["state"]["variables"] == {} and state["state"]["modules"] == []
    assert state["state_formatted"] == "(empty state)"
    turn = client.execute("print(x)")
    assert not turn.success and turn.error == "NameError: name 'x' is not defined"

    client.delete_session()
    gone = http.post(f"/session/{client.session_id}/execute", json={"code": "1"})
    assert gone.status_code == 404 and "error" in gone.json()

    once = client.execute_stateless("print(6 * 7)")
    assert once.success and once.output == "42\n" and once.error is None
    failed = client.execute_stateless(
        "import sys\nprint('w', file=sys.stderr)\nraise KeyError('k')"
    )
    assert not failed.success and failed.error == "KeyError: 'k'"
    assert failed.output.startswith("\n[stderr]: w\n\n[error]: KeyError: 'k'\nTraceback")
