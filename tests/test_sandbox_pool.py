"""Sandbox replicas behind one client (SandboxPool): two real sandbox servers over
HTTP, runs spread over both, sessions pinned to theirs, a replica killed mid-way, and
the flows' ``sandbox.url`` with several URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter

import pytest

from mathmill.errors import ConfigError
from mathmill.flows.options import SandboxOptions
from mathmill.flows.resources import _sandbox
from mathmill.records import ExecutionResult
from mathmill.sandbox import HTTPSandbox, Limits, SandboxPool, SandboxUnavailable
from mathmill.sandbox.protocol import SessionNotFound
from tests.sandbox_support import sandbox_server

pytestmark = pytest.mark.slow
ENV = {"PATH": "/usr/bin:/bin"}


class Counted(HTTPSandbox):
    """An HTTP replica that counts the stateless runs it was given."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url, timeout_s=5)
        self.runs = 0

    async def execute(self, code: str, limits: Limits | None = None) -> ExecutionResult:
        self.runs += 1
        return await super().execute(code, limits)


async def scenario(bases: list[str], stop_second: object) -> None:
    replicas = [Counted(base) for base in bases]
    pool = SandboxPool(replicas, down_for_s=60)
    try:
        runs = await asyncio.gather(
            *(pool.execute(f"import time; time.sleep(0.2); print({i})") for i in range(8))
        )
        assert [r.stdout for r in runs] == [f"{i}\n" for i in range(8)]
        assert all(r.runs >= 2 for r in replicas), [r.runs for r in replicas]

        sessions = [await pool.create_session() for _ in range(4)]
        assert Counter(s.split("-")[0] for s in sessions) == {"r0": 2, "r1": 2}
        for i, sid in enumerate(sessions):
            await pool.run_in_session(sid, f"x = {i}")
        turns = [await pool.run_in_session(sid, "x * 10") for sid in sessions]
        assert [t.stdout for t in turns] == ["0\n", "10\n", "20\n", "30\n"]
        assert [t.session_id for t in turns] == sessions
        assert "x=" in (await pool.session_state(sessions[1])).summary
        health = await pool.health()
        assert health["ok"] and health["replicas_up"] == 2

        # The second server is stopped: stateless runs go to the first; its
        # sessions fail with a clear error; the pool's health says which is down.
        await asyncio.to_thread(stop_second)  # type: ignore[arg-type]
        before = replicas[1].runs
        again = [await pool.execute("print(6 * 7)") for _ in range(4)]
        assert {r.stdout for r in again} == {"42\n"}
        assert replicas[1].runs - before == 1  # tried once, then left alone
        dead = next(s for s in sessions if s.startswith("r1-"))
        with pytest.raises(SandboxUnavailable):
            await pool.run_in_session(dead, "x")
        alive = next(s for s in sessions if s.startswith("r0-"))
        assert (await pool.run_in_session(alive, "x + 1")).status == "ok"
        health = await pool.health()
        assert health["ok"] and health["replicas_up"] == 1
        assert health["replicas"][1]["ok"] is False
        with pytest.raises(SessionNotFound, match="not a session"):
            await pool.run_in_session("no-replica-prefix", "x")
    finally:
        await pool.close()


def test_runs_spread_sessions_stay_and_a_dead_replica_is_skipped() -> None:
    with sandbox_server([sys.executable], ENV) as first, contextlib.ExitStack() as stack:
        second = stack.enter_context(sandbox_server([sys.executable], ENV))
        asyncio.run(scenario([first, second], stack.close))


def test_sandbox_url_with_several_urls_makes_a_pool() -> None:
    async def build(url: str) -> object:
        box = await _sandbox(SandboxOptions(backend="http", url=url))
        await box.close()
        return box

    pool = asyncio.run(build("http://a:1, http://b:2"))
    assert isinstance(pool, SandboxPool) and len(pool.replicas) == 2
    assert isinstance(asyncio.run(build("http://a:1")), HTTPSandbox)
    with pytest.raises(ConfigError, match=r"sandbox\.url"):
        asyncio.run(build(" , "))
