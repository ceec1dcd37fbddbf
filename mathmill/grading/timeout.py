"""Timeouts that work in threads and worker processes.

math-verify's own timeout uses SIGALRM and so only works in the main thread. Here:
in the main thread, an interval timer interrupts the comparison; anywhere else the
comparison runs in a helper process that is killed when it overruns.
"""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mathmill.errors import GradingTimeout

__all__ = ["GradingTimeout", "call_with_timeout"]

T = TypeVar("T")
_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _alarm(_signum: int, _frame: Any) -> None:
    raise GradingTimeout


def _helper() -> cf.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(max_workers=1)
        return _pool


def _reset_helper() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            for process in list(getattr(_pool, "_processes", {}).values()):
                process.kill()
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None


def call_with_timeout(fn: Callable[..., T], *args: Any, seconds: float) -> T:
    """``fn(*args)``, or :class:`GradingTimeout` after ``seconds``."""
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    future = _helper().submit(fn, *args)
    try:
        return future.result(timeout=seconds)
    except cf.TimeoutError as e:
        _reset_helper()
        raise GradingTimeout from e
