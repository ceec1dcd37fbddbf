"""A concurrency limit whose capacity can change while requests wait on it.

``asyncio.Semaphore`` has a fixed size; an endpoint's limit is tuned live (see
:mod:`mathmill.llm.live`), so the client holds a :class:`Limiter` instead. Lowering
the capacity never interrupts a request in flight: new requests wait until the count
in flight falls below the new capacity.

>>> import asyncio
>>> async def demo() -> tuple[int, int]:
...     limit = Limiter(1)
...     async with limit:
...         busy = limit.in_flight
...     limit.resize(3)
...     return busy, limit.capacity
>>> asyncio.run(demo())
(1, 3)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

__all__ = ["Limiter"]


class Limiter:
    """At most ``capacity`` holders at once; ``resize`` changes it at any time.

    Waiters are served first come, first served. Release and resize are synchronous,
    so a cancelled task can never leave a slot taken.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # waiters woken (result set) that have not run yet: each holds a slot. Counted,
        # not found by scanning the queue, so a release costs O(1) with many waiting.
        self._woken = 0

    @property
    def capacity(self) -> int:
        """Holders allowed at once."""
        return self._capacity

    @property
    def in_flight(self) -> int:
        """Holders now."""
        return self._in_flight

    def resize(self, capacity: int) -> None:
        """Set the capacity; waiters proceed at once when it grows. 0 pauses: holders
        finish, newcomers wait.
        """
        self._capacity = max(0, int(capacity))
        self._wake()

    def _wake(self) -> None:
        # woken waiters that have not run yet hold a slot; cancelled ones hold nothing
        free = self._capacity - self._in_flight - self._woken
        if free <= 0:
            return
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                self._woken += 1
                free -= 1
                if free <= 0:
                    break

    async def __aenter__(self) -> Limiter:
        if self._in_flight >= self._capacity or self._waiters:
            loop = asyncio.get_running_loop()
            again = False
            while True:
                waiter: asyncio.Future[None] = loop.create_future()
                # capacity shrank between a wake-up and now: queue again, at the front
                (self._waiters.appendleft if again else self._waiters.append)(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    woken = waiter.done() and not waiter.cancelled()
                    self._remove(waiter)
                    if woken:
                        self._woken -= 1
                        self._wake()  # pass the slot on
                    raise
                self._remove(waiter)
                self._woken -= 1
                if self._in_flight < self._capacity:
                    break
                again = True
        self._in_flight += 1
        return self

    def _remove(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    async def __aexit__(self, *exc: object) -> None:
        self._in_flight -= 1
        self._wake()
