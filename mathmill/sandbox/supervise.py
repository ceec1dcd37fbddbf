"""Supervising a sandboxed job from outside: collect its output under caps and a
deadline, and turn what it reported into the ExecutionResult fields.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from dataclasses import dataclass
from typing import Any

from mathmill.sandbox.limits import Limits

__all__ = ["Supervised", "cpu_aware_exit", "kill_namespace_except", "result_fields", "supervise"]


@dataclass
class Supervised:
    """What a supervisor collected from a running job."""

    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    result: bytes = b""
    timed_out: bool = False
    overflow: bool = False


def supervise(out_r: int, err_r: int, res_r: int, deadline: float, cap: int) -> Supervised:
    """Read the job's stdout/stderr (capped) and result pipe until all close, the
    deadline passes (``timed_out``) or an output passes its cap (``overflow``).

    The result is one JSON line: once it is complete, output is drained for a
    moment more, so a background process holding the pipes cannot stall the turn.
    """
    got = Supervised()
    buffers = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray()}
    open_fds = set(buffers)
    drain_until: float | None = None
    while open_fds:
        now = time.monotonic()
        if drain_until is None and buffers[res_r].endswith(b"\n"):
            drain_until = now + 0.2
        if drain_until is not None and now >= drain_until:
            break
        remaining = (drain_until or deadline) - now
        if remaining <= 0:
            got.timed_out = True
            break
        ready, _, _ = select.select(list(open_fds), [], [], remaining)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                continue
            buffers[fd] += chunk
            if fd != res_r and len(buffers[fd]) > cap:
                got.overflow = True
        if got.overflow:
            break
    for fd in buffers:
        os.close(fd)
    got.stdout, got.stdout_truncated = bytes(buffers[out_r][:cap]), len(buffers[out_r]) > cap
    got.stderr, got.stderr_truncated = bytes(buffers[err_r][:cap]), len(buffers[err_r]) > cap
    got.result = bytes(buffers[res_r])
    return got


def _status_from(got: Supervised, reported: dict[str, Any] | None, exit_status: int | None) -> str:
    if got.timed_out:
        return "timeout"
    if got.overflow:
        return "output_limit"
    if reported is not None:
        return str(reported.get("status", "crashed"))
    if (
        exit_status is not None
        and exit_status < 0
        and -exit_status in (signal.SIGXCPU, signal.SIGKILL)
    ):
        return "timeout" if -exit_status == signal.SIGXCPU else "crashed"
    return "crashed"


def cpu_aware_exit(status: int, usage: Any, limits: Limits) -> int:
    code = os.waitstatus_to_exitcode(status)
    if code == -signal.SIGKILL and usage.ru_utime + usage.ru_stime >= limits.cpu_limit - 0.5:
        return -signal.SIGXCPU  # killed at the hard CPU limit: a timeout, not a crash
    return code


def result_fields(
    got: Supervised, exit_status: int | None, wall_ms: float, usage: Any = None
) -> dict[str, Any]:
    """The ExecutionResult fields from what the supervisor saw and the job reported."""
    reported: dict[str, Any] | None = None
    with contextlib.suppress(ValueError):
        reported = json.loads(got.result) if got.result else None
    own = reported or {}
    return {
        "status": _status_from(got, reported, exit_status),
        "stdout": _decode(got.stdout),
        "stderr": _decode(got.stderr),
        "stdout_truncated": got.stdout_truncated,
        "stderr_truncated": got.stderr_truncated,
        "exit_code": own.get("exit_code", exit_status),
        "wall_ms": wall_ms,
        "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000 if usage else own.get("cpu_ms", 0.0),
        "peak_memory_kb": usage.ru_maxrss if usage else own.get("peak_memory_kb"),
        "backend": "local",
        "reported": reported,
    }


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def kill_namespace_except(keep: set[int]) -> None:
    """SIGKILL every process visible in /proc (our pid namespace) except ``keep``."""
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in keep:
            with contextlib.suppress(OSError):
                os.kill(int(name), signal.SIGKILL)
