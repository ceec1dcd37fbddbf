"""Every pipeline against an endpoint that fails 30% of its requests (429 with
Retry-After, 500, 503, malformed JSON, truncated content, hangs past the timeout):
the run ends within its timeouts, every row ends ok or with its recorded reason, the
retries are visible in the run's usage, and a re-run on a healthy endpoint completes
what failed without paying a finished call twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mathmill.llm.fake_server import FakeOpenAIServer, Fault, RecordedRequest, Reply, Response
from tests.synth_world import SynthWorld

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FAULTS = [
    Fault.status(429, retry_after=0.05),
    Fault.status(500),
    Fault.status(503, retry_after=0.05),
    Fault.hang(3.0),
    Fault.malformed(),
    Fault.truncated("{"),
]
ROLE = {"model": "fake", "timeout_s": 1.0, "max_retries": 3}
GSM8K = Path(__file__).parent / "data" / "gsm8k_test.jsonl"


def faulty(handler: Any, rate: float = 0.3) -> FakeOpenAIServer:
    return FakeOpenAIServer(handler, fault_rate=rate, faults=FAULTS, seed=7)


def retries(usage: dict[str, dict[str, float]]) -> float:
    return sum(stage.get("retries", 0) for stage in usage.values())


def report_retries(out: Path) -> int:
    """The retries column of the run's report.md, summed over stages."""
    lines = (out / "report.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if "| retries |" in line)
    column = [c.strip() for c in lines[header].split("|")].index("retries")
    total = 0
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cell = [c.strip() for c in line.split("|")][column]
        total += int(float(cell.replace(",", ""))) if cell else 0
    return total


def summary(pipeline: str, outcomes: list[str], expected: int, accounted: int) -> None:
    """One line for docs/reliability.md (shown with pytest -s)."""
    faults = sum(o not in ("ok", "models") for o in outcomes)
    print(  # noqa: T201
        f"\nfault campaign: {pipeline}: {len(outcomes)} requests, {faults} faults "
        f"({faults / max(1, len(outcomes)):.0%}: {dict(Counter(outcomes))}); "
        f"rows accounted {accounted}/{expected}"
    )


def run_under_faults(flow: Any, **params: Any) -> tuple[Any, float]:
    """Run a flow; it either completes or stops with IncompleteRun naming the stage,
    the chunk, the cause after the retries, and how to resume.
    """
    start = time.monotonic()
    state = asyncio.run(flow(**params, return_state=True))
    elapsed = time.monotonic() - start
    if not state.is_completed():
        message = str(state.message)
        assert "IncompleteRun" in message and "re-run" in message, message
        assert "after 4 attempts" in message and "chunk" in message, message
    return state, elapsed


def test_synthesize_under_faults(prefect_api: dict[str, str], tmp_path: Path) -> None:
    from mathmill.flows.synthesize import synthesize
    from mathmill.records import Dropped, Problem, SolutionRow
    from mathmill.storage import RunStore
    from tests.test_synthesize import world_config

    world = SynthWorld(kinds=("ok", "fix", "crash", "stuck"))
    out = tmp_path / "run"
    with faulty(world) as fake:
        cfg = world_config(fake.base_url, str(out), topics=8)
        models = {"default": {**ROLE, "base_url": fake.base_url}}
        cfg = cfg.model_copy(update={"models": type(cfg.models)(**models)})
        _state, elapsed = run_under_faults(synthesize, params=cfg)
        outcomes = fake.outcomes()
    for kind in ("status:429", "status:500", "malformed", "truncated", "hang"):
        assert kind in outcomes, kind
    assert elapsed < 600
    assert report_retries(out) > 0  # retries are visible in the report

    # A healthy endpoint: the re-run finishes every row and pays no finished call twice.
    with FakeOpenAIServer(world) as fake:
        cfg2 = cfg.model_copy(
            update={"models": type(cfg.models)(default={**ROLE, "base_url": fake.base_url})}
        )
        result = asyncio.run(synthesize(params=cfg2))
    assert world.paid_twice() == {}
    store = RunStore(str(out))
    problems = store.dataset("problems").read_all(Problem)
    rows = [
        *store.dataset("verified").read_all(SolutionRow),
        *store.dataset("unverified").read_all(SolutionRow),
    ]
    per_problem = Counter(r.problem_id for r in rows)
    assert {p.id for p in problems} == set(per_problem) and set(per_problem.values()) == {2}
    assert result.verified + result.unverified == len(rows)
    assert all(r.status == "verified" or r.reason for r in rows)
    assert all(d.reason for d in store.dataset("dropped").read_all(Dropped))
    summary("synthesize", outcomes, len(problems) * 2, len(rows))


def tir_handler(request: RecordedRequest) -> Response:
    messages = (request.body or {}).get("messages", [])
    turn = sum(1 for m in messages if m["role"] == "assistant")
    if turn == 0:
        return Reply("<python>\nprint(6 * 7)\n")
    return Reply("<final_answer>\\boxed{42}</final_answer>")


def test_tir_under_faults(prefect_api: dict[str, str], tmp_path: Path) -> None:
    from mathmill.flows.tir import TirParams, tir

    problems = tmp_path / "in.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "problem": f"6 x 7 ({i})?", "answer": "42"}) + "\n"
            for i in range(20)
        )
    )

    def params(url: str) -> TirParams:
        return TirParams.model_validate(
            {
                "input": str(problems),
                "out": str(tmp_path / "run"),
                "max_turns": 3,
                "solver": {**ROLE, "base_url": url},
                "sandbox": {"timeout_s": 2.0, "workers": 1},
            }
        )

    with faulty(tir_handler) as fake:
        start = time.monotonic()
        state = asyncio.run(tir(params=params(fake.base_url), return_state=True))
        elapsed = time.monotonic() - start
        outcomes = fake.outcomes()
    assert elapsed < 600
    assert any(k.startswith("status:") for k in outcomes) and "hang" in outcomes
    out = tmp_path / "run"
    rows = [json.loads(x) for x in (out / "sharegpt.jsonl").read_text().splitlines()]
    failed = (
        [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
        if (out / "failed.jsonl").exists()
        else []
    )
    ids = Counter([r["id"] for r in rows] + [r["id"] for r in failed])
    assert state is not None
    assert set(ids) == {f"q{i}" for i in range(20)} and set(ids.values()) == {1}
    assert all(r["metadata"].get("reason") or r["metadata"].get("error") for r in failed)
    summary("tir", outcomes, 20, sum(ids.values()))


def sample_handler(request: RecordedRequest) -> Response:
    n = int((request.body or {}).get("n") or 1)
    return Reply(contents=[f"so the answer is \\boxed{{{i}}}" for i in range(n)])


def test_sample_under_faults(prefect_api: dict[str, str], tmp_path: Path) -> None:
    from mathmill.flows.sample import SampleParams, sample

    def params(url: str, out: Path) -> SampleParams:
        return SampleParams.model_validate(
            {
                "input": str(GSM8K),
                "limit": 30,
                "out": str(out),
                "samples": 2,
                "model": {**ROLE, "base_url": url},
                "backend": {"chunk_size": 3},
            }
        )

    with faulty(sample_handler) as fake:
        _state, elapsed = run_under_faults(sample, params=params(fake.base_url, tmp_path / "run"))
        # a truncated reply is an answer (finish_reason 'length'), not an error
        outcomes = fake.outcomes()
        answered = sum(o in ("ok", "truncated") for o in outcomes)
    assert elapsed < 600
    assert report_retries(tmp_path / "run") > 0
    with FakeOpenAIServer(sample_handler) as fake:
        result = asyncio.run(sample(params(fake.base_url, tmp_path / "run")))
        resumed = len(fake.requests)
    assert result.problems == 30 and result.samples == 60
    # one request per problem: those answered under faults are not asked again
    assert resumed == 30 - answered
    summary("sample", outcomes, 60, result.samples)
