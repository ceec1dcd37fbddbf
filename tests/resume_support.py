"""The kill point of the resume tests (tests/test_tir_resume.py,
tests/test_curate_resume.py): ``mathmill run ...`` killed with SIGKILL halfway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress


def kill_9_midway(
    argv: list[str],
    env: dict[str, str],
    *,
    ready: Callable[[], bool],
    paused: threading.Event,
    timeout_s: float = 300.0,
) -> None:
    """Run ``argv`` in a session of its own until ``ready()`` holds (it must still be
    running), then set ``paused`` (the fake server's handler hangs new requests), give
    the requests in flight half a second, and SIGKILL the whole process group.
    """
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before the kill point: {argv}"
            assert time.monotonic() < deadline, f"no kill point after {timeout_s:g} s"
            time.sleep(0.02)
        paused.set()
        time.sleep(0.5)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        paused.clear()


def run_env(prefect_api: dict[str, str]) -> dict[str, str]:
    """The environment of a ``mathmill run`` subprocess in a test: this one's basics
    (home, locale, PATH, PYTHONPATH, TMPDIR, HF offline mode) and the test's Prefect
    server, nothing else (no keys, no stray settings).
    """
    keep = ("HOME", "LANG", "PATH", "PYTHONPATH", "TMPDIR", "HF_HUB_OFFLINE")
    return {k: v for k, v in os.environ.items() if k in keep} | prefect_api
