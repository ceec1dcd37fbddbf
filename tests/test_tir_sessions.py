"""tir without Prefect: sessions are always deleted (also after a failure, a timeout or
a dead endpoint) and never more are open than the sandbox's capacity.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.fake_server import FakeOpenAIServer, Fault, RecordedRequest, Reply, Response
from mathmill.pipeline.chunks import Runtime
from mathmill.records import Problem, SamplingParams
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.local import LocalSandbox
from mathmill.storage import RunStore
from mathmill.tasks.tir import TirConfig, tir_chunk


class CountingSandbox(LocalSandbox):
    """The real local sandbox, counting the sessions open at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.open = 0
        self.peak = 0

    async def create_session(self) -> str:
        sid = await super().create_session()
        self.open += 1
        self.peak = max(self.peak, self.open)
        return sid

    async def delete_session(self, session_id: str) -> None:
        self.open -= 1
        await super().delete_session(session_id)


def handler(request: RecordedRequest) -> Response:
    messages = (request.body or {}).get("messages", [])
    problem = messages[1]["content"]
    turn = sum(1 for m in messages if m["role"] == "assistant")
    if "down" in problem and turn == 1:
        return Fault.status(400)  # the endpoint fails for good mid-trajectory
    if "spin" in problem:
        return Reply("<python>\nwhile True:\n    pass\n")
    if "silent" in problem:
        return Reply("No tags at all.")
    if turn == 0:
        return Reply("<python>\nimport time\ntime.sleep(0.2)\nprint(7)\n")
    return Reply("<final_answer>\\boxed{7}</final_answer>")


async def test_sessions_are_deleted_and_bounded(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.handler = handler
    statements = [f"Problem {i}: what is 7?" for i in range(6)]
    statements += ["spin forever", "silent one", "endpoint down later"]
    problems = [Problem(statement=s, answer="7") for s in statements]
    cfg = TirConfig(max_turns=2, turn_timeout_s=1.0, sampling=SamplingParams(seed=0))
    sandbox = CountingSandbox(workers=1, limits=Limits(timeout_s=1.0), max_sessions_per_worker=8)
    endpoint = EndpointConfig(base_url=fake.base_url, model="m", max_retries=0)
    async with LLMPool() as pool, sandbox:
        rt = Runtime(
            store=RunStore(str(tmp_path)),
            pool=pool,
            endpoints={"solver": endpoint},
            sandbox=sandbox,
            row_concurrency=64,
        )
        rows = await tir_chunk(rt, cfg, problems, asyncio.Semaphore(2))
        health = await sandbox.health()
    assert health["sessions"] == 0  # every session deleted, whatever happened
    assert sandbox.open == 0 and sandbox.peak == 2  # never more than the capacity
    status = {
        p.statement: a.verdict.status
        for p, a in zip(problems, rows.attempts, strict=True)
        if a.verdict
    }
    assert status["spin forever"] == "failed" and status["silent one"] == "failed"
    assert status["endpoint down later"] == "failed"
    assert [status[s] for s in statements[:6]] == ["correct"] * 6
    assert rows.counts["tir.failed"] == 3 and rows.errors and not rows.errors[0].transient


async def test_several_samples_per_problem_get_their_own_seed_and_id(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    from mathmill.tasks.tir_export import sharegpt

    fake.handler = handler
    problem = Problem(statement="Problem 0: what is 7?", answer="7", source_id="q0")
    cfg = TirConfig(max_turns=2, samples=3, sampling=SamplingParams(seed=10, temperature=0.7))
    endpoint = EndpointConfig(base_url=fake.base_url, model="m", max_retries=0)
    async with LLMPool() as pool, LocalSandbox(workers=1) as sandbox:
        rt = Runtime(RunStore(str(tmp_path)), pool, {"solver": endpoint}, sandbox)
        rows = await tir_chunk(rt, cfg, [problem], asyncio.Semaphore(4))
    assert [a.sample_index for a in rows.attempts] == [0, 1, 2]
    assert len({a.id for a in rows.attempts}) == 3
    assert [sharegpt(problem, a, 3)["id"] for a in rows.attempts] == ["q0-s0", "q0-s1", "q0-s2"]
    seeds = {(r.body or {}).get("seed") for r in fake.requests}
    assert seeds == {10, 11, 12}
    assert all((r.body or {}).get("stop") == ["</python>"] for r in fake.requests)
