"""A stateless job in flight, supervised by the zygote's event loop.

The zygote runs several jobs at once. Each job is PID 1 of its own namespaces; the
zygote reads its stdout, stderr and result pipes as they become readable, learns of
its exit from a pidfd, and enforces its own deadline and output cap: what one job
does never moves another job's deadline or counts against its limits.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from typing import Any

from mathmill.sandbox.box import Box
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.supervise import Supervised, cpu_aware_exit, result_fields

__all__ = ["Job", "kill_group"]

_CHUNK = 1 << 16
_RESULT_CAP = 1 << 20  # a result report is a few hundred bytes
# After PID 1 has exited, the pipes close at once (the kernel killed the rest of its
# namespace); this bounds the wait should they not.
_DRAIN_S = 0.2
# Without pidfds (Linux < 5.3), how often an exit is polled.
_POLL_S = 0.01


def kill_group(pid: int) -> None:
    """SIGKILL the process group of ``pid`` and ``pid`` itself (its namespace dies with it)."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class Job:
    """One stateless job: its process, output pipes (stdout, stderr, result) and deadline.

    The zygote registers nothing itself: the job registers its descriptors with the
    selector, with itself as the callback (``key.data(fd)``), and unregisters them.
    """

    def __init__(
        self,
        request_id: Any,
        pid: int,
        fds: tuple[int, int, int],
        box: Box,
        start: float,
        selector: selectors.BaseSelector,
    ) -> None:
        self.request_id = request_id
        self.pid = pid
        self.box = box
        self.limits: Limits = box.limits
        self.start = start
        self.deadline = start + box.limits.timeout_s
        self.out_fd, self.err_fd, self.res_fd = fds
        self.buffers = {fd: bytearray() for fd in fds}
        self.open = set(fds)
        self.got = Supervised()
        self.status: tuple[int, Any] | None = None  # (wait status, rusage) once reaped
        self.exited_at = 0.0
        self._selector = selector
        self._pidfd = _pidfd(pid)
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ, self._on_output)
        if self._pidfd is not None:
            selector.register(self._pidfd, selectors.EVENT_READ, self._on_exit)

    @property
    def done(self) -> bool:
        """Reaped, and every pipe closed."""
        return self.status is not None and not self.open

    def _on_output(self, fd: int) -> None:
        if fd not in self.open:
            return  # closed earlier in the same round of events
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError:
            chunk = b""
        if not chunk:
            self._close(fd)
            return
        buffer = self.buffers[fd]
        buffer += chunk
        # the result pipe is the job's too (it can find it in /proc/self/fd): capped
        cap = _RESULT_CAP if fd == self.res_fd else self.limits.max_output_bytes
        if len(buffer) > cap:
            self.got.overflow = True
            self._stop()

    def _on_exit(self, _fd: int) -> None:
        if self.status is None:
            self._reap()

    def _reap(self) -> None:
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return
        self.status = (status, usage)
        self.exited_at = time.monotonic()
        if self._pidfd is not None:
            self._selector.unregister(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _close(self, fd: int) -> None:
        if fd in self.open:
            self.open.discard(fd)
            self._selector.unregister(fd)
            os.close(fd)

    def _stop(self) -> None:
        """Kill the job (its whole namespace) and stop reading its output."""
        if self.status is None:  # reaped already: its pid may be another's now
            kill_group(self.pid)
        for fd in list(self.open):
            self._close(fd)

    def tick(self, now: float) -> float:
        """Enforce the deadline (and the drain bound); returns when to look again."""
        if self.status is None:
            if now >= self.deadline and not (self.got.timed_out or self.got.overflow):
                self.got.timed_out = True
                self._stop()
            if self._pidfd is None:
                self._reap()
                return now + _POLL_S
            if self.got.timed_out or self.got.overflow:
                return now + 1.0  # killed: the pidfd says when it is gone
            return self.deadline
        if self.open and now >= self.exited_at + _DRAIN_S:
            for fd in list(self.open):
                self._close(fd)
        return self.exited_at + _DRAIN_S

    def result(self) -> dict[str, Any]:
        """The ExecutionResult fields (once :attr:`done`)."""
        assert self.status is not None
        status, usage = self.status
        cap = self.limits.max_output_bytes
        got = self.got
        out, err = self.buffers[self.out_fd], self.buffers[self.err_fd]
        got.stdout, got.stdout_truncated = bytes(out[:cap]), len(out) > cap
        got.stderr, got.stderr_truncated = bytes(err[:cap]), len(err) > cap
        got.result = bytes(self.buffers[self.res_fd])
        wall_ms = (self.exited_at - self.start) * 1000
        fields = result_fields(got, cpu_aware_exit(status, usage, self.limits), wall_ms, usage)
        fields.pop("reported")
        return fields

    def abort(self) -> None:
        """Kill the job and wait for it (the zygote is shutting down)."""
        self._stop()
        if self.status is None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        if self._pidfd is not None:
            self._selector.unregister(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
