"""Several sandbox replicas behind one :class:`~mathmill.sandbox.protocol.Sandbox`.

Client-side balancing, so no load balancer needs sticky sessions: a stateless run goes
to the replica with the fewest runs in flight (and on to the next one when a replica
is unreachable); a session lives on the replica that created it, and its id carries
the replica's index (``r1-<id>``), so every later turn goes back there. Replicas are
any backends: HTTP servers (``sandbox.url`` with several comma-separated URLs) or
Docker containers (``sandbox.replicas`` with ``backend: docker``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from mathmill.records import ExecutionResult
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import (
    Sandbox,
    SandboxUnavailable,
    SessionNotFound,
    SessionResult,
    SessionState,
)

__all__ = ["SandboxPool"]

T = TypeVar("T")


class SandboxPool:
    """Spread runs over ``replicas``; pin each session to its replica.

    Args:
        replicas: started backends (the pool closes them on :meth:`close`).
        down_for_s: how long an unreachable replica gets no new stateless runs.
    """

    def __init__(self, replicas: Sequence[Sandbox], *, down_for_s: float = 5.0) -> None:
        if not replicas:
            raise ValueError("a sandbox pool needs at least one replica")
        self.replicas = list(replicas)
        self.down_for_s = down_for_s
        self._in_flight = [0] * len(self.replicas)
        self._down_until = [0.0] * len(self.replicas)
        self._next = 0

    def _order(self) -> list[int]:
        """Replicas to try: those up first, fewest in flight first, rotating ties."""
        now = time.monotonic()
        n = len(self.replicas)
        self._next = (self._next + 1) % n
        rotation = [(self._next + i) % n for i in range(n)]
        return sorted(rotation, key=lambda i: (self._down_until[i] > now, self._in_flight[i]))

    async def _first_reachable(self, call: Callable[[Sandbox], Awaitable[T]]) -> tuple[int, T]:
        """``call`` on the least busy replica, then the next while one is unreachable
        (an unreachable replica gets no new work for ``down_for_s``).
        """
        errors = []
        for index in self._order():
            self._in_flight[index] += 1
            try:
                return index, await call(self.replicas[index])
            except SandboxUnavailable as e:
                self._down_until[index] = time.monotonic() + self.down_for_s
                errors.append(f"replica {index}: {e}")
            finally:
                self._in_flight[index] -= 1
        raise SandboxUnavailable("no sandbox replica answered: " + "; ".join(errors))

    async def execute(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        """Run ``code`` once on the least busy reachable replica."""
        _, result = await self._first_reachable(lambda replica: replica.execute(code, limits))
        return result

    async def create_session(self) -> str:
        """Start a session on the least busy reachable replica."""
        index, sid = await self._first_reachable(lambda replica: replica.create_session())
        return f"r{index}-{sid}"

    def _route(self, session_id: str) -> tuple[Sandbox, str]:
        head, _, sid = session_id.partition("-")
        if not (head.startswith("r") and head[1:].isdigit() and sid):
            raise SessionNotFound(f"not a session of this sandbox pool: {session_id!r}")
        index = int(head[1:])
        if index >= len(self.replicas):
            raise SessionNotFound(f"no replica {index} for session {session_id!r}")
        return self.replicas[index], sid

    async def run_in_session(
        self, session_id: str, code: str, timeout_s: float | None = None
    ) -> SessionResult:
        """Run one turn on the session's replica."""
        replica, sid = self._route(session_id)
        result = await replica.run_in_session(sid, code, timeout_s)
        return result.model_copy(update={"session_id": session_id})

    async def session_state(self, session_id: str) -> SessionState:
        """A session's state, from its replica."""
        replica, sid = self._route(session_id)
        return await replica.session_state(sid)

    async def reset_session(self, session_id: str) -> None:
        """Forget a session's state."""
        replica, sid = self._route(session_id)
        await replica.reset_session(sid)

    async def delete_session(self, session_id: str) -> None:
        """End a session on its replica."""
        replica, sid = self._route(session_id)
        await replica.delete_session(sid)

    async def health(self) -> dict[str, Any]:
        """Each replica's health; ``ok`` when at least one answers."""
        answers: list[dict[str, Any]] = []
        for index, replica in enumerate(self.replicas):
            try:
                answers.append({"replica": index, **await replica.health()})
            except SandboxUnavailable as e:
                answers.append({"replica": index, "ok": False, "error": str(e)})
        up = [a for a in answers if a.get("ok")]
        layers = up[0].get("layers", {}) if up else {}
        return {
            "ok": bool(up),
            "backend": "pool",
            "replicas": answers,
            "replicas_up": len(up),
            "layers": layers,
        }

    async def close(self) -> None:
        """Close every replica."""
        await asyncio.gather(*(r.close() for r in self.replicas), return_exceptions=True)
