"""The zygote's session table: stateful sessions, each a holder process it talks to
over a socket, with an idle TTL, a turn limit and least-recently-used eviction.

The holder has run user code, so the zygote treats it as untrusted: its socket is
non-blocking, a session answers one request at a time (the others wait in order),
and an answer that does not come within the turn's timeout (plus a margin) ends the
session. Nothing a session does holds up the zygote's other jobs and sessions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mathmill.sandbox import isolation as iso
from mathmill.sandbox.jobs import kill_group
from mathmill.sandbox.wire import MessageReader, encode

__all__ = ["Session", "Sessions"]

log = logging.getLogger("mathmill.sandbox")

_MARGIN_S = 15.0  # beyond a turn's timeout, for the holder to answer

Reply = Callable[[Any, dict[str, Any]], None]


@dataclass
class _Ask:
    request_id: Any
    msg: dict[str, Any]
    wait_s: float


@dataclass
class Session:
    """One session: its PID 1, the zygote's end of its socket, its job directory."""

    sid: str
    pid: int
    sock: socket.socket
    job_root: str
    cgroup: str | None = None
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    turns: int = 0
    asks: deque[_Ask] = field(default_factory=deque)
    in_flight: _Ask | None = None
    deadline: float = 0.0
    outgoing: bytearray = field(default_factory=bytearray)
    reader: MessageReader = field(default_factory=MessageReader)


def _lost(ask: _Ask, sid: str) -> dict[str, Any]:
    if ask.msg["op"] == "exec":
        return {
            "status": "crashed",
            "stdout": "",
            "stderr": "session died; it was removed",
            "exit_code": None,
            "wall_ms": 0.0,
            "state": None,
            "session_lost": True,
        }
    return {"error": f"session {sid!r} died", "code": 410}


class Sessions:
    """Sessions of one zygote. ``spawn(sid)`` starts a session's processes; ``reply``
    answers a request of the zygote's client.
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        spawn: Callable[[str], Session],
        reply: Reply,
        *,
        max_sessions: int,
        ttl_s: float,
        max_turns: int,
    ) -> None:
        self.table: dict[str, Session] = {}
        self._selector = selector
        self._spawn = spawn
        self._reply = reply
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_turns = max_turns

    def busy(self) -> bool:
        """A turn or a state request is in flight or queued, or an answer not yet sent."""
        return any(s.in_flight or s.asks or s.outgoing for s in self.table.values())

    def __len__(self) -> int:
        return len(self.table)

    def create(self, sid: str) -> dict[str, Any]:
        while len(self.table) >= self.max_sessions:
            oldest = min(self.table.values(), key=lambda s: s.last_used)
            log.info("sandbox: evicting least recently used session %s", oldest.sid)
            self.delete(oldest.sid)
        session = self._spawn(sid)
        session.sock.setblocking(False)
        self._selector.register(session.sock, selectors.EVENT_READ, self._on_socket(session))
        self.table[sid] = session
        return {"session_id": sid}

    def exec(self, request_id: Any, sid: str, code: str, timeout_s: float) -> dict[str, Any] | None:
        """Queue a turn; answered later (None) or now with an error."""
        session = self.table.get(sid)
        if session is None:
            return {"error": f"no session {sid!r}", "code": 404}
        if session.turns >= self.max_turns:
            return {
                "error": f"session {sid!r} reached its {self.max_turns} turns",
                "code": 409,
            }
        session.turns += 1
        msg = {"op": "exec", "code": code, "timeout_s": timeout_s}
        self._queue(session, _Ask(request_id, msg, timeout_s + _MARGIN_S))
        return None

    def state(self, request_id: Any, sid: str) -> dict[str, Any] | None:
        """Queue a state request; answered later (None) or now with an error."""
        session = self.table.get(sid)
        if session is None:
            return {"error": f"no session {sid!r}", "code": 404}
        self._queue(session, _Ask(request_id, {"op": "state"}, _MARGIN_S))
        return None

    def _queue(self, session: Session, ask: _Ask) -> None:
        session.last_used = time.monotonic()
        session.asks.append(ask)
        self._next(session)

    def _next(self, session: Session) -> None:
        if session.in_flight is not None or not session.asks:
            return
        ask = session.asks.popleft()
        session.in_flight = ask
        session.deadline = time.monotonic() + ask.wait_s
        session.outgoing += encode(ask.msg)
        self._flush(session)

    def _flush(self, session: Session) -> None:
        try:
            sent = session.sock.send(session.outgoing)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail(session, "its socket failed")
            return
        del session.outgoing[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if session.outgoing else 0)
        key = self._selector.get_key(session.sock)
        if key.events != events:
            self._selector.modify(session.sock, events, key.data)

    def _on_socket(self, session: Session) -> Callable[[int], None]:
        def ready(_fd: int) -> None:
            if self.table.get(session.sid) is not session:
                return  # ended earlier in the same round of events
            if session.outgoing:
                self._flush(session)
                if self.table.get(session.sid) is not session:
                    return
            try:
                data = session.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._fail(session, "its holder exited")
                return
            try:
                messages = session.reader.feed(data)
            except ValueError:
                self._fail(session, "it sent a malformed answer")
                return
            for message in messages:
                ask = session.in_flight
                if ask is None or not isinstance(message, dict):
                    self._fail(session, "it sent an answer nobody asked for")
                    return
                session.in_flight = None
                session.last_used = time.monotonic()
                if ask.msg["op"] == "exec":
                    message["backend"] = "local"
                self._reply(ask.request_id, message)
            self._next(session)

        return ready

    def _fail(self, session: Session, why: str) -> None:
        log.warning("sandbox: session %s removed: %s", session.sid, why)
        self.delete(session.sid)

    def delete(self, sid: str) -> dict[str, Any]:
        """End a session (its processes are killed); unanswered requests are told."""
        session = self.table.pop(sid, None)
        if session is None:
            return {"error": f"no session {sid!r}", "code": 404}
        self._selector.unregister(session.sock)
        session.sock.close()
        kill_group(session.pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(session.pid, 0)
        shutil.rmtree(session.job_root, ignore_errors=True)
        if session.cgroup:
            iso.PidsCgroup.remove(session.cgroup)
        asks = ([session.in_flight] if session.in_flight else []) + list(session.asks)
        for ask in asks:
            self._reply(ask.request_id, _lost(ask, sid))
        return {"deleted": sid}

    def reset(self, sid: str) -> dict[str, Any]:
        if sid not in self.table:
            return {"error": f"no session {sid!r}", "code": 404}
        self.delete(sid)
        return self.create(sid)

    def tick(self, now: float) -> float:
        """End sessions past their answer deadline or idle TTL; returns when to look again."""
        wake = now + 1.0
        for session in list(self.table.values()):
            if session.in_flight is not None:
                if now >= session.deadline:
                    self._fail(session, f"no answer in {session.in_flight.wait_s:.0f}s")
                else:
                    wake = min(wake, session.deadline)
            elif not session.asks and now - session.last_used > self.ttl_s:
                log.info(
                    "sandbox: session %s idle for %.0fs, deleted",
                    session.sid,
                    now - session.last_used,
                )
                self.delete(session.sid)
        return wake

    def close(self) -> None:
        for sid in list(self.table):
            self.delete(sid)
