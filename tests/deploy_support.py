"""Helpers for tests that drive a real local Prefect server and workers as a user
would: `mathmill server up`, `prefect worker start`, `prefect deployment run`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATHMILL = str(Path(sys.executable).parent / "mathmill")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_cmd(cmd: list[str], env: Mapping[str, str], timeout: float = 300) -> str:
    """Run ``cmd`` from the repository root; its output, or a failed assertion with it."""
    done = subprocess.run(
        cmd, env=dict(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def clean_env(work: Path) -> dict[str, str]:
    """This environment without Prefect or AWS settings, with its own Prefect home."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    return base | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(work)}


@contextmanager
def server_up(
    work: Path, env: Mapping[str, str], database: str | None = None
) -> Iterator[dict[str, str]]:
    """`mathmill server up` on a free port with its home in ``work`` (on ``database``
    when given: ``--database URL``); yields ``env`` with PREFECT_API_URL set;
    `mathmill server down` on exit.
    """
    home, port = work / "server", free_port()
    cmd = [MATHMILL, "server", "up", "--home", str(home), "--port", str(port)]
    up = run_cmd([*cmd, *(["--database", database] if database else [])], env, 240)
    url = f"http://127.0.0.1:{port}/api"
    assert f"export PREFECT_API_URL={url}" in up, up
    try:
        yield dict(env) | {"PREFECT_API_URL": url}
    finally:
        subprocess.run([MATHMILL, "server", "down", "--home", str(home)], env=env, check=False)


@contextmanager
def worker(
    pool: str, env: Mapping[str, str], work: Path, limit: int = 2, name: str | None = None
) -> Iterator[Path]:
    """A process worker on ``pool``; yields its log file (``worker-NAME.log``, default
    the pool's name); stopped on exit.
    """
    log = work / f"worker-{name or pool}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "process",
            "--limit",
            str(limit),
            *(["--name", name] if name else []),
        ],
        env=dict(env),
        cwd=work,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
