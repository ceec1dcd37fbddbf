"""The run's helper process: CPU-heavy side work of the orchestrator (grading with
math-verify and sympy, drawing the dataset report with matplotlib) goes to one helper
process, so that it runs on another core while the flow's event loop keeps sending
calls, and its imports are paid there, early (:func:`warm`), not on the run's path.

The helper is ``python -m mathmill.sidecar`` (nothing of the caller's ``__main__`` is
run there), one per orchestrator process, started on first use and reused by later
runs in that process; jobs go one at a time, in order, over its stdin and stdout. It is
off (the work runs in-process, as a plain call) with ``MATHMILL_SIDECAR=0`` or where
this process may use only one CPU.

What can go wrong, and what happens:

* the work raises: the error is raised to the caller as it is (any type, timeouts
  included), once;
* the work cannot be sent (it does not pickle) or read there: it runs in-process, the
  helper keeps serving the others;
* the helper dies or a job overruns its ``limit_s`` (counted from when it starts, not
  while it waits its turn): the helper is killed, every job sent to it runs in-process
  (a warning says so) and the next use starts a new helper.

Only mathmill's own code runs there (untrusted code is the sandbox's). Its environment
has no API keys, tokens or passwords (names with KEY, TOKEN, SECRET, PASSWORD or
CREDENTIAL, except ``AWS_*``: the report reads object storage), and each job carries
the caller's ``AWS_*`` settings as they are when it is sent. It ignores Ctrl-C (its
parent decides), and it dies with its parent (``PR_SET_PDEATHSIG``, and it exits when
its stdin closes).

>>> call_sync(len, "abc")
3
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import contextlib
import importlib
import itertools
import logging
import os
import pickle
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from mathmill.errors import SidecarUnusable

__all__ = ["GRADING", "REPORT", "call", "call_sync", "enabled", "helper_env", "stop", "warm"]

T = TypeVar("T")
log = logging.getLogger("mathmill.sidecar")

GRADING = ("mathmill.grading.reference", "math_verify", "math_verify.parser")
"""What grading imports (math-verify brings sympy): warmed before a stage grades."""
REPORT = (
    "mathmill.report",
    "mathmill.report.data",
    "mathmill.report.charts",
    "mathmill.report.html",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
)
"""What drawing the dataset report imports: warmed when a run starts."""

_WARM_S = 300.0  # an import that hangs (a font cache's lock) must not hold the line
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_HEADER = struct.Struct("!Q")


def enabled() -> bool:
    """Whether side work goes to the helper: not with ``MATHMILL_SIDECAR=0``, nor on a
    single CPU (where it would only add a process).
    """
    if os.environ.get("MATHMILL_SIDECAR", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus > 1


def helper_env() -> dict[str, str]:
    """The helper's environment: this process's, without API keys, tokens and
    passwords (``AWS_*`` kept for object storage), with mathmill importable.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or not _SECRET.search(k)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


# -- the wire: length-prefixed frames ------------------------------------------------
# caller -> helper: pickle((job, blob)); helper -> caller: pickle((job, kind, payload)),
# payload pickled apart, so a payload the caller cannot read fails that job alone.


def _write(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    """The next frame, unpickled; EOFError when the other side is gone."""

    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = stream.read(left)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    (n,) = _HEADER.unpack(exactly(_HEADER.size))
    return pickle.loads(exactly(n))


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


# -- in the helper -------------------------------------------------------------------


def _die_with(parent: int, deathsig: bool) -> None:
    """End when the parent does: SIGKILL from the kernel (Linux, ``deathsig``: only
    when the parent's main thread started it, as the signal follows the thread), and a
    watcher that notices a new parent; gone at once if the parent already is.
    """
    if deathsig:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the watcher does it
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _import(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)


def _outcome(job: int, blob: bytes) -> tuple[int, str, bytes]:
    """(job, "ok", result) | (job, "error", (error or None, its text)) |
    (job, "unusable", why), the payload pickled.
    """
    try:
        fn, args, aws = pickle.loads(blob)
    except Exception as e:
        return job, "unusable", _dumps(f"cannot read the work here: {type(e).__name__}: {e}")
    for name in [n for n in os.environ if n.startswith("AWS_") and n not in aws]:
        del os.environ[name]
    os.environ.update(aws)
    try:
        result = fn(*args)
    except Exception as e:
        error: bytes | None = None
        with contextlib.suppress(Exception):  # sent as text when it does not pickle
            error = _dumps(e)
        return job, "error", _dumps((error, f"{type(e).__name__}: {e}"))
    try:
        return job, "ok", _dumps(result)
    except Exception as e:
        return job, "error", _dumps((None, f"cannot send the result back: {e}"))


def serve(parent: int, deathsig: bool) -> None:
    """The helper's loop: read a job, say it started, run it, write its outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with(parent, deathsig)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the work's prints: to stderr
    sys.stdout = sys.stderr
    while True:
        try:
            job, blob = _read(inp)
        except EOFError:
            return
        _write(out, (job, "start", b""))
        _write(out, _outcome(job, blob))


# -- in the caller -------------------------------------------------------------------


class _Helper:
    """One helper process and the jobs sent to it, one at a time: a job is sent when
    the one before it is done, so a job whose caller gave up meanwhile is never sent.
    """

    def __init__(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "mathmill.sidecar", str(os.getpid()), str(int(main))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=helper_env(),
            process_group=0,  # the terminal's Ctrl-C is for the run, not for it
        )
        self.lock = threading.Lock()
        self.jobs: dict[int, tuple[cf.Future[Any], float | None, str]] = {}
        self.ids = itertools.count()
        self.outbox: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self.running: tuple[int, float | None] | None = None  # job, deadline
        self.wake = threading.Event()
        self.dead: str | None = None
        self.served = False  # a job finished here: it works
        for target in (self._send_loop, self._read_loop, self._watch_loop):
            threading.Thread(target=target, name="mathmill-sidecar", daemon=True).start()

    def submit(self, blob: bytes, limit_s: float | None, what: str) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        with self.lock:
            if self.dead is not None:
                raise SidecarUnusable(self.dead)
            job = next(self.ids)
            self.jobs[job] = (future, limit_s, what)
        self.outbox.put((job, blob))
        return future

    def _send_loop(self) -> None:
        assert self.proc.stdin is not None
        try:
            while (item := self.outbox.get()) is not None:
                job, blob = item
                with self.lock:
                    entry = self.jobs.get(job)
                try:
                    if entry is None or not entry[0].set_running_or_notify_cancel():
                        with self.lock:  # its caller gave up before its turn
                            self.jobs.pop(job, None)
                        continue
                except RuntimeError:  # settled meanwhile (the helper failed)
                    continue
                _write(self.proc.stdin, (job, blob))
                cf.wait([entry[0]])
        except Exception as e:  # a closed pipe, no memory for the frame
            self.fail(f"the helper process stopped taking work ({type(e).__name__}: {e})")

    def _read_loop(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                job, kind, payload = _read(self.proc.stdout)
                with self.lock:
                    if kind == "start":
                        entry = self.jobs.get(job)
                        limit = entry[1] if entry else None
                        self.running = (job, time.monotonic() + limit if limit else None)
                        self.wake.set()
                        continue
                    entry = self.jobs.pop(job, None)
                    self.running = None
                    self.served = True
                if entry is not None:
                    _settle(entry[0], kind, payload)
        except EOFError:  # it exited or was killed
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.fail(f"the helper process exited (code {self.proc.wait()})")
        except Exception as e:  # a frame that cannot be read: it cannot be trusted
            self.fail(f"cannot read the helper process ({type(e).__name__}: {e})")

    def _watch_loop(self) -> None:
        while self.dead is None:
            with self.lock:
                running = self.running
            deadline = running[1] if running else None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.wake.wait(wait):
                self.wake.clear()
                continue
            what = None
            with self.lock:
                if running is not None and self.running == running:  # still that job
                    entry = self.jobs.get(running[0])
                    what = entry[2] if entry else "a job"
            if what is not None:
                self.fail(f"{what} took too long")

    def fail(self, why: str, died: bool = True) -> None:
        """Kill the helper; every job sent to it fails with :class:`SidecarUnusable`.
        ``died``: it failed (not stopped), which counts toward giving up on helpers.
        """
        global _current, _deaths
        with self.lock:
            if self.dead is not None:
                return
            self.dead = why
            jobs, self.jobs = list(self.jobs.values()), {}
        with _lock:
            if _current is self:
                _current = None
            if died:
                _deaths = 0 if self.served else _deaths + 1
        self.wake.set()
        self.outbox.put(None)
        with contextlib.suppress(OSError):
            self.proc.kill()
        for future, _, _ in jobs:
            _settle(future, "unusable", _dumps(why))

    def stop(self) -> None:
        """End it now, whatever it is doing."""
        self.fail("the helper process was stopped", died=False)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


def _settle(future: cf.Future[Any], kind: str, payload: bytes) -> None:
    """Resolve ``future`` from an outcome; a payload that cannot be read here makes
    the job unusable (it runs here) or, for an error, a RuntimeError with its text.
    """
    if future.done():  # its caller gave up on it
        return
    try:
        try:
            value = pickle.loads(payload)
        except Exception as e:
            kind, value = "unusable", f"cannot read its outcome ({type(e).__name__}: {e})"
        if kind == "ok":
            future.set_result(value)
        elif kind == "error":
            error, text = value
            try:
                exc = pickle.loads(error) if error else RuntimeError(text)
            except Exception:
                exc = RuntimeError(text)
            future.set_exception(exc)
        else:
            future.set_exception(SidecarUnusable(value))
    except cf.InvalidStateError:  # cancelled meanwhile
        pass


_lock = threading.Lock()
_current: _Helper | None = None
_warmed: set[str] = set()
_hooked = False
_deaths = 0  # helpers in a row that died before finishing a job
_MAX_DEATHS = 3


def _helper() -> _Helper | None:
    """The helper, started on first use; None when :func:`enabled` says no."""
    global _current, _hooked
    if not enabled():
        return None
    with _lock:
        if _current is None and _deaths >= _MAX_DEATHS:
            return None  # it cannot serve here: the work runs in this process
        if _current is None:
            try:
                _current = _Helper()
            except OSError as e:  # no process can be started: the work runs here
                log.warning("cannot start the helper process (%s); working in this one", e)
                return None
            _warmed.clear()
            if not _hooked:
                _hooked = True
                atexit.register(stop)
        return _current


def _submit(fn: Callable[..., Any], args: tuple[Any, ...], limit_s: float | None) -> Any:
    """The work sent to the helper: its future, or None when there is no helper or the
    work does not pickle (known here, before anything is sent; the helper keeps
    serving the others).
    """
    helper = _helper()
    if helper is None:
        return None
    what = getattr(fn, "__qualname__", repr(fn))
    try:
        blob = pickle.dumps((fn, args, _aws()), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        log.warning("%s cannot go to the helper process (%s); running it here", what, e)
        return None
    try:
        return helper.submit(blob, limit_s, what)
    except SidecarUnusable:
        return None


def _fell_back(fn: Callable[..., Any], error: BaseException) -> None:
    log.warning(
        "the helper process could not run %s (%s); running it in this process",
        getattr(fn, "__qualname__", fn),
        error,
    )


def warm(*modules: str) -> None:
    """Start the helper (if it is on) and have it import ``modules`` now, in the
    background, so that the work that needs them does not wait for them. Not waited
    for; a module that fails to import fails the work that needs it, not this.
    """
    todo = tuple(m for m in modules if m not in _warmed)
    if not todo or _helper() is None:
        return
    _warmed.update(todo)
    future = _submit(_import, (todo,), _WARM_S)
    if future is not None:
        future.add_done_callback(lambda f: f.cancelled() or f.exception())


async def call(
    fn: Callable[..., T], *args: Any, limit_s: float | None = None, in_thread: bool = False
) -> T:
    """``fn(*args)`` in the helper, awaited without blocking the event loop; in-process
    when the helper is off or cannot run it (``in_thread``: then in a worker thread,
    else on the loop). ``fn`` must be importable by name and ``args`` must pickle (or
    it runs here); ``limit_s``: the most it may take there once started.
    """
    future = _submit(fn, args, limit_s)
    if future is not None:
        try:
            result: T = await asyncio.wrap_future(future)
            return result
        except SidecarUnusable as e:
            _fell_back(fn, e)
    if in_thread:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def call_sync(fn: Callable[..., T], *args: Any, limit_s: float | None = None) -> T:
    """:func:`call` for synchronous code: ``fn(*args)`` in the helper, waited for."""
    future = _submit(fn, args, limit_s)
    if future is not None:
        try:
            result: T = future.result()
            return result
        except SidecarUnusable as e:
            _fell_back(fn, e)
    return fn(*args)


def stop() -> None:
    """Stop the helper now, whatever it is doing (at the end of a command, at exit)."""
    with _lock:
        helper = _current
    if helper is not None:
        helper.stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:3] == ["1"])
