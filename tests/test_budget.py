"""Accounting over every backend and the run budget: the meter's engine and sandbox
seconds, engine generations counted as calls, generate runs' usage merged by dispatch,
and a budget (tokens or USD) that stops a real sample run (real HTTP, a real Prefect
server) and a re-run with a larger one that resumes without paying any call twice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mathmill.errors import EndpointError, IncompleteChunk, IncompleteRun
from mathmill.llm.cache import CallCache
from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from mathmill.llm.usage import SpendLimit, UsageMeter
from mathmill.llm.vllm_engine import EngineConfig
from mathmill.pipeline.budget import BUDGET_PATH, Budget, budget_message
from mathmill.pipeline.chunks import Runtime, use_runtime
from mathmill.records import ErrorInfo, Generation, GenRequest, TokenUsage
from mathmill.storage import RunStore
from mathmill.tasks.generation import GenBackend, dispatch, generate, generation_specs

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "tests" / "data" / "problems" / "amc23_5.jsonl"
USER = [{"role": "user", "content": "What is 2+2?"}]
PER_CALL = 20  # tokens the fake server reports for each call (10 in, 10 out)


# -- the meter ---------------------------------------------------------------------------


def test_new_fields_survive_summary_round_trip_and_merge() -> None:
    meter = UsageMeter()
    meter.record("cot", model="m", prompt_tokens=10, completion_tokens=5, cost_usd=0.5)
    meter.record("cot", model="m", cached=True)
    meter.record_gpu("cot", 2.5)
    meter.record_sandbox("verify.exec", 0.125)
    meter.record_sandbox("verify.exec", 0.125)
    summary = meter.summary()
    assert summary["cot"]["gpu_s"] == 2.5 and summary["verify.exec"]["sandbox_s"] == 0.25
    assert summary["total"]["gpu_s"] == 2.5 and summary["total"]["sandbox_s"] == 0.25
    back = UsageMeter.from_summary(json.loads(json.dumps(summary)))
    assert back.summary() == summary
    assert back.spent() == (15, 0.5)  # cached calls are free
    table = meter.to_markdown()
    assert "| GPU s | sandbox s |" in table.splitlines()[0]
    assert "| 0.5000 | 2.5 | 0.0 |" in table  # the cot row: USD, GPU s, sandbox s
    merged = UsageMeter()
    merged.merge(meter)
    merged.merge(back)
    assert merged.total().gpu_s == 5.0 and merged.total().sandbox_s == 0.5
    assert merged.spent() == (30, 1.0)
    # an older summary (no gpu_s / sandbox_s) still reads
    old = {k: v for k, v in summary["cot"].items() if k not in ("gpu_s", "sandbox_s")}
    assert UsageMeter.from_summary({"cot": old}).total().gpu_s == 0.0


def test_cli_usage_table_shows_engine_and_sandbox_seconds() -> None:
    from rich.console import Console

    from mathmill.flows.cli import usage_table

    meter = UsageMeter()
    meter.record_gpu("sample", 12.34)
    meter.record_sandbox("tir.exec", 0.5)
    console = Console(width=200, record=True)
    console.print(usage_table(meter.summary()))
    text = console.export_text()
    assert "GPU s" in text and "sbx s" in text and "12.3" in text and "0.5" in text
    old = {"x": {k: v for k, v in meter.summary()["total"].items() if k != "gpu_s"}}
    console.print(usage_table(old))  # a result written before these columns


def test_budget_reached_by_tokens_or_usd_counting_earlier_runs() -> None:
    meter = UsageMeter()
    assert meter.budget_reached() is None
    meter.limit = SpendLimit(max_usd=1.0, usd_before=0.75, tokens_before=500)
    meter.record("a", model="m", prompt_tokens=1, cost_usd=0.2)
    assert meter.budget_reached() is None and meter.spent() == (501, pytest.approx(0.95))
    meter.record("a", model="m", prompt_tokens=1, cost_usd=0.1)
    assert meter.budget_reached() == "budget reached: spent $1.0500 of $1.0000"
    meter.limit = SpendLimit(max_tokens=0)
    assert meter.budget_reached() == "token budget reached: spent 2 of 0 tokens"
    assert ErrorInfo(kind="budget", message="x").transient


# -- the client ----------------------------------------------------------------------------


async def test_client_sends_nothing_past_the_budget_but_replays_the_cache(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    fake.handler = lambda r: Reply("4", prompt_tokens=10, completion_tokens=10)
    cache = CallCache(str(tmp_path / "calls.sqlite"))
    async with LLMPool(cache=cache) as pool:
        pool.meter.limit = SpendLimit(max_tokens=30)
        client = pool.client(EndpointConfig(base_url=fake.base_url, model="m", max_retries=0))
        first = await client.chat(USER, stage="s")
        second = await client.chat([{"role": "user", "content": "and 3+3?"}], stage="s")
        assert first.ok and second.ok and pool.meter.spent() == (40, 0.0)
        refused = await client.chat(
            [{"role": "user", "content": "5+5?"}], stage="s", raise_on_error=False
        )
        assert refused.error is not None and refused.error.kind == "budget"
        assert refused.error.transient and "spent 40 of 30 tokens" in refused.error.message
        with pytest.raises(EndpointError, match="token budget reached") as raised:
            await client.chat([{"role": "user", "content": "6+6?"}], stage="s")
        assert raised.value.kind == "budget"
        replay = await client.chat(USER, stage="s")  # a cache hit: free, so still served
        assert replay.cached and replay.text == "4"
    cache.close()
    assert len(fake.requests) == 2
    stage = pool.meter.stages()["s"]
    assert (stage.calls, stage.cached, stage.errors) == (2, 1, 0)


# -- the engine and deployment backends ----------------------------------------------------


class _Engine:
    """Stands in for vLLM: two prompt tokens and three completion tokens a request."""

    load_s = 0.0

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, requests: Sequence[GenRequest]) -> list[Generation]:
        self.batches.append(len(requests))
        return [
            Generation(
                id=r.id,
                model="engine-model",
                backend="vllm",
                usage=TokenUsage(prompt_tokens=2, completion_tokens=3),
            )
            for r in requests
        ]


def _engine_runtime(tmp_path: Path, kind: str = "engine") -> Runtime:
    backend = GenBackend(kind=kind, engine=EngineConfig(model="/models/x"))  # type: ignore[arg-type]
    return Runtime(
        store=RunStore(str(tmp_path / "run")),
        pool=LLMPool(),
        endpoints={},
        backends={"sampler": backend},
    )


def test_engine_generations_count_as_calls_and_the_budget_stops_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _Engine()
    monkeypatch.setattr("mathmill.tasks.generation.get_engine", lambda config: engine)
    rt = _engine_runtime(tmp_path)
    rt.pool.meter.limit = SpendLimit(max_tokens=15)
    requests = [GenRequest(id=f"r{i}", prompt=f"q{i}") for i in range(3)]
    gens = asyncio.run(generate(rt, "sampler", requests, stage="sample"))
    assert [g.error for g in gens] == [None] * 3
    s = rt.pool.meter.stages()["sample"]
    assert (s.calls, s.prompt_tokens, s.completion_tokens) == (3, 6, 9)
    assert s.gpu_s >= 0.0 and s.models == {"engine-model"}
    more = [GenRequest(id=f"m{i}", prompt=f"q{i}") for i in range(2)]
    gens = asyncio.run(generate(rt, "sampler", more, stage="sample"))
    assert [g.error.kind if g.error else None for g in gens] == ["budget", "budget"]
    assert all(g.error and g.error.transient for g in gens)
    assert engine.batches == [3]  # the second batch never reached the engine


def test_dispatch_merges_the_generate_runs_usage_and_respects_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mathmill.pipeline.fanout import usage_path
    from mathmill.tasks.generation import write_requests

    rt = _engine_runtime(tmp_path, "deployment")
    backend = rt.backends["sampler"]
    refs = write_requests(rt.store, "sample", [GenRequest(id="a", prompt="q")], 8)
    specs = generation_specs(rt, "sample", refs, {"engine": "x"})
    sent: list[dict[str, Any]] = []

    async def run_and_wait(deployment: str, parameters: dict[str, Any], **kw: Any) -> str:
        sent.append(parameters)
        worker = UsageMeter()  # what the generate flow run records
        worker.record("sample", model="x", prompt_tokens=7, completion_tokens=8)
        worker.record_gpu("sample", 3.0)
        rt.store.write_bytes(usage_path("run-1"), json.dumps(worker.summary()).encode())
        return "run-1"

    monkeypatch.setattr("mathmill.tasks.generation.run_and_wait", run_and_wait)
    monkeypatch.setattr("mathmill.tasks.generation.require_server", lambda *a: None)
    with use_runtime(rt):
        assert asyncio.run(dispatch(rt.store, specs, backend, None, rt.store.url)) == 1
        total = rt.pool.meter.total()
        assert (total.calls, total.prompt_tokens, total.gpu_s) == (1, 7, 3.0)
        rt.pool.meter.limit = SpendLimit(max_tokens=15)
        with pytest.raises(IncompleteChunk, match="not sent: token budget reached"):
            asyncio.run(dispatch(rt.store, specs, backend, None, rt.store.url))
    assert len(sent) == 1


# -- a budget on a real run ----------------------------------------------------------------


def _answer(request: RecordedRequest) -> Reply:
    return Reply(contents=["so the answer is \\boxed{3}"], prompt_tokens=10, completion_tokens=10)


def _sample_params(tmp_path: Path, model: dict[str, Any], budget: Budget) -> Any:
    from mathmill.flows.sample import SampleParams

    return SampleParams(
        input=str(PROBLEMS),
        out=str(tmp_path / "run"),
        samples=1,
        concurrency=2,
        model=model,  # type: ignore[arg-type]
        budget=budget,
    )


def _bodies(fake: FakeOpenAIServer) -> list[str]:
    return [json.dumps(r.body, sort_keys=True) for r in fake.requests]


@pytest.mark.parametrize("by", ["tokens", "usd"])
def test_a_budget_stops_the_run_and_a_larger_one_resumes_paying_nothing_twice(
    by: str, fake: FakeOpenAIServer, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    """5 problems, 20 tokens a call, 2 calls in flight. A budget of 50 tokens (or
    $0.05 at $1 per 1,000 tokens, from a block's prices) stops the run after about 3
    calls; the re-run with a larger budget sends only the other 2.
    """
    from mathmill.blocks.llm import LLMEndpoint
    from mathmill.flows.sample import sample

    fake.handler = _answer
    if by == "tokens":
        model: dict[str, Any] = {"base_url": fake.base_url, "model": "m"}
        small, large = Budget(max_tokens=50), Budget(max_tokens=1000)
        field, spent_at = "max_tokens", lambda s: s["tokens"]
    else:
        block = LLMEndpoint(
            base_url=fake.base_url,
            model="m",
            api_key=SecretStr("k"),
            input_price_per_1m=1000.0,
            output_price_per_1m=1000.0,
            live_concurrency=False,
        )
        block.save("budget-priced", overwrite=True)
        model = {"block": "budget-priced"}
        small, large = Budget(max_usd=0.05), Budget(max_usd=1.0)
        field, spent_at = "max_usd", lambda s: s["usd"]
    out = tmp_path / "run"

    with pytest.raises(IncompleteRun) as stopped:
        asyncio.run(sample(_sample_params(tmp_path, model, small)))
    message = str(stopped.value)
    assert "budget reached: spent" in message and f"--set budget.{field}=" in message
    assert "finished rows are kept" in message
    paid = len(fake.requests)
    # sent while under budget (50 / 20 -> at most 3), plus at most the calls in flight
    assert 1 <= paid <= 3 + 1 < 5
    spent = json.loads((out / BUDGET_PATH).read_text())
    assert spent["tokens"] == PER_CALL * paid
    assert spent_at(spent) == pytest.approx(PER_CALL * paid / (1 if by == "tokens" else 1000))
    assert len(RunStore(str(out)).dataset("problems").keys()) == 1  # the load stage's rows
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"].startswith("INCOMPLETE")

    # The same budget again: nothing more is sent, it stops at once.
    with pytest.raises(IncompleteRun, match="budget reached"):
        asyncio.run(sample(_sample_params(tmp_path, model, small)))
    assert len(fake.requests) == paid

    result = asyncio.run(sample(_sample_params(tmp_path, model, large)))
    assert result.problems == 5 and result.samples == 5
    bodies = _bodies(fake)
    assert len(bodies) == 5 and len(set(bodies)) == 5  # no request sent twice
    assert result.usage["total"]["cached"] == paid  # the first run's calls, replayed
    assert json.loads((out / BUDGET_PATH).read_text())["tokens"] == 5 * PER_CALL
    assert "GPU s | sandbox s" in (out / "report.md").read_text()


def test_budget_message_names_the_field_to_raise(tmp_path: Path) -> None:
    rt = _engine_runtime(tmp_path)
    assert budget_message(rt) is None
    rt.pool.meter.limit = SpendLimit(max_usd=0.5, usd_before=0.5)
    assert "--set budget.max_usd=1)" in (budget_message(rt) or "")
    rt.pool.meter.limit = SpendLimit(max_tokens=100, tokens_before=100)
    assert "--set budget.max_tokens=200)" in (budget_message(rt) or "")


def test_budget_is_set_from_the_command_line() -> None:
    from mathmill.flows.cli_params import build_params, parse_set
    from mathmill.flows.sample import SampleParams
    from mathmill.flows.synthesize import SynthesizeParams
    from mathmill.flows.tir import TirParams

    pairs = parse_set(SampleParams, ["input=x.jsonl", "budget.max_usd=2.5"])
    params = build_params(SampleParams, None, pairs, "sample params")
    assert params.budget == Budget(max_usd=2.5)  # type: ignore[attr-defined]
    for model in (SynthesizeParams, TirParams, SampleParams):
        assert model.model_fields["budget"].default is None


# -- sandbox seconds from real runs ------------------------------------------------------


def test_tir_run_records_sandbox_seconds(prefect_api: dict[str, str], tmp_path: Path) -> None:
    from mathmill.flows.tir import tir
    from tests.test_tir import handler, params

    with FakeOpenAIServer(handler) as fake:
        result = asyncio.run(tir(params=params(fake.base_url, tmp_path)))
    assert result.usage["tir.exec"]["sandbox_s"] > 0
    assert result.usage["total"]["sandbox_s"] == pytest.approx(
        sum(row["sandbox_s"] for name, row in result.usage.items() if name != "total"), abs=0.01
    )


def test_synthesize_run_records_sandbox_seconds_and_resumes_within_a_budget(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from tests.synth_world import SynthWorld
    from tests.test_synthesize import run_flow, world_config

    world = SynthWorld(kinds=("ok", "fix"))
    with FakeOpenAIServer(world) as fake:
        cfg = world_config(fake.base_url, str(tmp_path / "run"), topics=2)
        tight = cfg.model_copy(update={"budget": Budget(max_tokens=400)})
        with pytest.raises(IncompleteRun, match="token budget reached"):
            run_flow(tight)
        stopped_at = world.answered
        result = run_flow(cfg)  # no budget: the rest, nothing paid twice
    assert 0 < stopped_at < world.answered
    assert world.paid_twice() == {}
    assert result.verified == 8
    assert result.usage["verify.exec"]["sandbox_s"] > 0


def test_a_generate_flow_run_records_its_usage_for_dispatch(
    prefect_api: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mathmill.flows.generate import GenerateParams
    from mathmill.flows.generate import generate as generate_flow
    from mathmill.tasks.generation import write_requests

    engine = _Engine()
    monkeypatch.setattr("mathmill.tasks.generation.get_engine", lambda config: engine)
    monkeypatch.setattr("mathmill.flows.generate.get_engine", lambda config: engine)
    rt = _engine_runtime(tmp_path, "deployment")
    config = rt.backends["sampler"].engine
    assert config is not None
    requests = [GenRequest(id=f"r{i}", prompt=f"q{i}") for i in range(3)]
    refs = write_requests(rt.store, "sample", requests, 2)
    specs = generation_specs(rt, "sample", refs, {"engine": config.identity()})
    params = GenerateParams(out=rt.store.url, specs=specs, engine=config)
    state = asyncio.run(generate_flow(params, return_state=True))
    flow_run_id = str(state.state_details.flow_run_id)
    recorded = json.loads((tmp_path / "run" / ".usage" / f"{flow_run_id}.json").read_text())
    assert recorded["sample"]["calls"] == 3 and engine.batches == [2, 1]
    assert (recorded["sample"]["prompt_tokens"], recorded["sample"]["completion_tokens"]) == (6, 9)
    assert recorded["sample"]["gpu_s"] >= 0.0
