"""Helpers for sandbox tests: start the HTTP server, as an unprivileged user if we are root."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mathmill

REPO = Path(mathmill.__file__).resolve().parents[1]
NOBODY = 65534
_IMPORTS = "import mathmill.sandbox.server, numpy, sympy, scipy, pandas, fastapi, uvicorn, typer"


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
    command: list[str], env: dict[str, str], *, timeout_s: float = 3.0
) -> Iterator[str]:
    """Run ``mathmill sandbox serve`` on a free port; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *command,
            "-m",
            "mathmill",
            "sandbox",
            "serve",
            "--port",
            str(port),
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
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"sandbox server exited: {out[-2000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
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
