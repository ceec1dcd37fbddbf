"""The run's helper process: CPU-heavy side work of the orchestrator (grading with
math-verify and sympy, drawing the dataset report with matplotlib) goes to one spawned
process, so that it runs on another core while the flow's event loop keeps sending
calls, and its imports are paid there, early (:func:`warm`), not on the run's path.

One helper per orchestrator process, started on first use and reused by later runs in
that process. It is off (the work runs in-process, as a plain call) with
``MATHMILL_SIDECAR=0`` or where this process may use only one CPU. A helper that dies,
cannot take the work (an argument that does not pickle) or overruns its ``limit_s`` is
killed and the work is done in-process: the result is the same, only later. An error
the work itself raises is raised to the caller as is.

Only mathmill's own code runs there (no untrusted code: that is the sandbox's), without
the environment's API keys and tokens; it dies with its parent.

>>> call_sync(len, "abc")
3
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import importlib
import logging
import multiprocessing
import os
import pickle
import re
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from mathmill.errors import SidecarUnusable

__all__ = ["GRADING", "REPORT", "call", "call_sync", "enabled", "stop", "warm"]

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

_SECRET_NAME = re.compile(r"API_KEY|ACCESS_TOKEN|HF_TOKEN|HUGGING_FACE_HUB_TOKEN", re.IGNORECASE)
_pool: cf.ProcessPoolExecutor | None = None
_lock = threading.Lock()
_warmed: set[str] = set()


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


def _init() -> None:
    """In the helper: die with the parent (Linux), drop API keys and tokens from the
    environment (grading and the report need none).
    """
    for name in [n for n in os.environ if _SECRET_NAME.search(n)]:
        del os.environ[name]
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: it exits when its pipe closes
        pass


def _helper() -> cf.ProcessPoolExecutor | None:
    """The helper, started on first use (spawn: this process has threads); None when
    :func:`enabled` says no.
    """
    global _pool
    if not enabled():
        return None
    with _lock:
        if _pool is None:
            context = multiprocessing.get_context("spawn")
            _pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_init)
            _warmed.clear()
            _stop_at_exit()
        return _pool


_hooked = False


def _stop_at_exit() -> None:
    """Kill the helper when this process exits, before concurrent.futures' and
    multiprocessing's own exit hooks wait for the work it is doing (an import no longer
    needed): hooks run last registered first.
    """
    global _hooked
    if not _hooked:
        _hooked = True
        atexit.register(_reset)  # before multiprocessing's, which joins it (LIFO)
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(_reset)


def _import(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)


def warm(*modules: str) -> None:
    """Start the helper (if it is on) and have it import ``modules`` now, in the
    background, so that the work that needs them does not wait for them. Not waited
    for; a module that fails to import fails the work that needs it, not this.
    """
    pool = _helper()
    todo = tuple(m for m in modules if m not in _warmed)
    if pool is None or not todo:
        return
    _warmed.update(todo)
    try:
        pool.submit(_import, todo).add_done_callback(_ignore)
    except (RuntimeError, BrokenProcessPool):  # shut down or broken: on next use
        _reset()


def _ignore(future: cf.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception never retrieved" noise


def _reset() -> None:
    """Kill the helper (a later use starts a new one)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def stop() -> None:
    """Stop the helper now, whatever it is doing (at the end of a command)."""
    _reset()


def _run(blob: bytes) -> Any:
    """In the helper: the pickled ``(fn, args)``, called."""
    try:
        fn, args = pickle.loads(blob)
    except Exception as e:
        raise SidecarUnusable(f"{type(e).__name__}: {e}") from None
    return fn(*args)


_BROKEN = (BrokenProcessPool, SidecarUnusable, cf.TimeoutError, asyncio.TimeoutError)


def _submit(fn: Callable[..., Any], args: tuple[Any, ...]) -> cf.Future[Any] | None:
    """The work, sent to the helper; None when there is none or it cannot take it
    (pickled here, so that what does not pickle is known before it is sent).
    """
    pool = _helper()
    if pool is None:
        return None
    try:
        blob = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        return pool.submit(_run, blob)
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError, *_BROKEN) as e:
        _fell_back(fn, e)
        return None


async def call(
    fn: Callable[..., T], *args: Any, limit_s: float | None = None, in_thread: bool = False
) -> T:
    """``fn(*args)`` in the helper, awaited without blocking the event loop; in-process
    when the helper is off or fails (``in_thread``: then in a worker thread, else on the
    loop). ``fn`` and ``args`` must pickle; ``fn`` must be importable by name.
    """
    future = _submit(fn, args)
    if future is not None:
        try:
            result: T = await asyncio.wait_for(asyncio.wrap_future(future), limit_s)
            return result
        except _BROKEN as e:
            _fell_back(fn, e)
    if in_thread:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def call_sync(fn: Callable[..., T], *args: Any, limit_s: float | None = None) -> T:
    """:func:`call` for synchronous code: ``fn(*args)`` in the helper, waited for."""
    future = _submit(fn, args)
    if future is not None:
        try:
            result: T = future.result(limit_s)
            return result
        except _BROKEN as e:
            _fell_back(fn, e)
    return fn(*args)


def _fell_back(fn: Callable[..., Any], error: BaseException) -> None:
    why = "took too long" if isinstance(error, cf.TimeoutError | asyncio.TimeoutError) else error
    log.warning(
        "the helper process could not run %s (%s); running it in this process",
        getattr(fn, "__qualname__", fn),
        why or type(error).__name__,
    )
    _reset()
