"""The pieces of the synthesize flow without Prefect: the call cache, code extraction,
problem checks, dedup, cache keys and role resolution.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from mathmill.errors import ConfigError
from mathmill.flows.options import ModelRole, resolve_role
from mathmill.flows.synthesize import SynthesizeParams, plan
from mathmill.llm.cache import CallCache
from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.fake_server import FakeOpenAIServer, Fault, Reply
from mathmill.pipeline.chunks import ChunkSpec, map_rows
from mathmill.records import ErrorInfo, Problem, SamplingParams
from mathmill.storage import ChunkRef
from mathmill.tasks.verify import extract_code
from mathmill.tasks.writing import canonical_text, dedup_problems, solution_leak


async def test_call_cache_replays_finished_calls_without_sending_them(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    fake.handler = lambda r: Reply("four " + str(r.body and r.body.get("seed")))
    endpoint = EndpointConfig(base_url=fake.base_url, model="m", max_retries=0)
    messages = [{"role": "user", "content": "2+2?"}]
    cache = CallCache(str(tmp_path / "calls.sqlite"))
    async with LLMPool(cache=cache) as pool:
        client = pool.client(endpoint)
        first = await client.chat(messages, sampling=SamplingParams(seed=1), stage="s")
        again = await client.chat(messages, sampling=SamplingParams(seed=1), stage="s")
        other = await client.chat(messages, sampling=SamplingParams(seed=2), stage="s")
        salted = await client.chat(
            messages, sampling=SamplingParams(seed=1), stage="s", cache_salt="sample-2"
        )
    assert len(fake.requests) == 3  # the repeat was replayed
    assert again.cached and not first.cached
    assert (again.text, again.usage) == (first.text, first.usage)
    assert other.text == "four 2" and salted.text == "four 1"
    assert pool.meter.stages()["s"].calls == 3 and pool.meter.stages()["s"].cached == 1
    cache.close()
    # a new process (a new cache object on the same file) replays too
    reopened = CallCache(str(tmp_path / "calls.sqlite"))
    async with LLMPool(cache=reopened) as pool:
        replay = await pool.client(endpoint).chat(messages, sampling=SamplingParams(seed=1))
    assert replay.cached and replay.text == "four 1" and len(fake.requests) == 3
    assert len(reopened) == 3


async def test_call_cache_never_stores_failures_or_the_key(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    fake.enqueue(Fault.status(503), Reply("ok"))
    endpoint = EndpointConfig(
        base_url=fake.base_url, model="m", max_retries=0, api_key=SecretStr("sk-SECRET-123")
    )
    path = tmp_path / "calls.sqlite"
    async with LLMPool(cache=CallCache(str(path))) as pool:
        failed = await pool.client(endpoint).chat(
            [{"role": "user", "content": "x"}], raise_on_error=False
        )
        retried = await pool.client(endpoint).chat([{"role": "user", "content": "x"}])
    assert failed.error is not None and failed.error.status == 503 and failed.error.transient
    assert retried.text == "ok" and not retried.cached
    assert b"sk-SECRET-123" not in path.read_bytes()


def test_extract_code_takes_the_last_python_block() -> None:
    reply = "Draft:\n```python\nprint(1)\n```\nBetter:\n```py\nx = 2\nprint(x)\n```\n"
    assert extract_code(reply) == "x = 2\nprint(x)"
    assert extract_code("```python\nprint(3)\n") == "print(3)"  # cut off by max_tokens
    assert extract_code("The answer is 3.") is None
    assert extract_code("```\nprint(4)\n```") == "print(4)"


@pytest.mark.parametrize(
    ("statement", "leaks"),
    [
        ("Find the number of integers n with 1 <= n <= 100 such that n^2 + 1 is prime.", False),
        ("Express your answer as a common fraction.", False),
        ("Compute 2^10 mod 7. Answer: 2", True),
        ("Find x. The answer is 4.", True),
        ("Find x if 2x = 8. \\boxed{4}", True),
        ("Find x. Solution: divide by 2.", True),
    ],
)
def test_problems_that_give_the_answer_away_are_caught(statement: str, leaks: bool) -> None:
    assert (solution_leak(statement) is not None) is leaks


def test_dedup_keeps_the_first_of_each_canonical_statement_then_the_limit() -> None:
    texts = ["Find x, if x+1 = 2.", "find x if x + 1 = 2", "Find y if y = 3.", "Find z if z=4."]
    got = dedup_problems([Problem(statement=t) for t in texts], limit=2)
    assert [p.statement for p in got.rows] == [texts[0], texts[2]]  # type: ignore[union-attr]
    assert [(d.reason, d.record["statement"]) for d in got.dropped] == [  # type: ignore[index]
        ("duplicate", texts[1]),
        ("over_limit", texts[3]),
    ]
    assert canonical_text("A,  B!") == "a b"


def test_cache_key_changes_with_input_config_prompts_and_code() -> None:
    ref = ChunkRef(
        dataset="d", key="k", path="/p", sha256="a" * 64, rows=1, nbytes=1, record_type="Problem"
    )
    base = ChunkSpec(stage="s", index=0, inputs=[ref], config={"t": 1}, store_url="/r")
    same = ChunkSpec(stage="s", index=0, inputs=[ref], config={"t": 1}, store_url="/r")
    assert base.cache_key() == same.cache_key()
    changes = [
        {"inputs": [ref.model_copy(update={"sha256": "b" * 64})]},
        {"config": {"t": 2}},
        {"prompts": {"synth_code": "c" * 64}},
        {"code": "v2"},
        {"store_url": "/other"},
    ]
    for change in changes:
        assert base.model_copy(update=change).cache_key() != base.cache_key(), change


def test_error_info_knows_what_is_worth_retrying() -> None:
    def e(kind: str, status: int | None = None) -> ErrorInfo:
        return ErrorInfo(kind=kind, message="m", status=status)

    assert e("timeout").transient and e("connection").transient and e("sandbox").transient
    assert e("status", 503).transient and e("status", 429).transient
    assert not e("status", 400).transient and not e("invalid_json").transient


def test_role_resolution_reads_the_key_from_the_named_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    role = ModelRole(base_url="http://h/v1", model="m", api_key_env="MY_KEY", max_concurrency=3)
    with pytest.raises(ConfigError, match=r"models\.coder\.api_key_env: .*MY_KEY is unset"):
        resolve_role(role, "coder", None)
    monkeypatch.setenv("MY_KEY", "sk-live")
    endpoint = resolve_role(role, "coder", None)
    assert endpoint.api_key.get_secret_value() == "sk-live" and endpoint.max_concurrency == 3
    assert "sk-live" not in endpoint.model_dump_json() and "sk-live" not in endpoint.identity
    with pytest.raises(ConfigError, match="no base_url and no embedded model"):
        resolve_role(ModelRole(), "critic", None)


def test_config_is_strict_and_roles_fall_back_to_the_default() -> None:
    with pytest.raises(ValidationError, match="short_cots"):
        SynthesizeParams(short_cots=-1)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SynthesizeParams.model_validate({"topic": 3})
    with pytest.raises(ValidationError, match="api_key_env"):
        SynthesizeParams.model_validate({"models": {"default": {"api_key_env": "sk-abc-123!"}}})
    cfg = SynthesizeParams.model_validate(
        {
            "models": {
                "default": {"base_url": "http://d/v1", "model": "big", "max_tokens": 300},
                "critic": {"model": "judge", "temperature": 0.5},
            }
        }
    )
    roles = cfg.models.merged()
    assert (roles["critic"].model, roles["critic"].base_url) == ("judge", "http://d/v1")
    assert roles["critic"].temperature == 0.5 and roles["critic"].max_tokens == 300
    assert roles["generator"].temperature == 1.0  # the role's built-in default
    assert plan(cfg).roles["critic"] == "http://d/v1 judge"


def test_embedded_model_says_why_it_died(tmp_path: Path) -> None:
    import subprocess
    import sys

    from mathmill.llm.embedded import EmbeddedModel

    model = EmbeddedModel()
    assert model.died() is None  # never started
    model.log_path = tmp_path / "server.log"
    model.log_path.write_text("loading model\nGGML_ASSERT: out of memory\n")
    model.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    model.process.wait()
    assert model.died() == "exit code 3: loading model | GGML_ASSERT: out of memory"


def test_map_rows_keeps_order_bounds_concurrency_and_runs_every_row_past_a_failure() -> None:

    running, peak, done = 0, 0, []

    async def row(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (i % 3))  # rows finish out of order
        running -= 1
        done.append(i)
        if i in (7, 3):
            raise ValueError(f"row {i}")
        return i * i

    assert asyncio.run(map_rows(range(5), lambda i: row(i + 10), 2)) == [100, 121, 144, 169, 196]
    assert peak == 2
    done.clear()
    with pytest.raises(ValueError, match="row 3"):  # the first failure in row order
        asyncio.run(map_rows(range(12), row, 4))
    assert sorted(done) == list(range(12)) and peak == 4
    assert asyncio.run(map_rows([], row, 4)) == []
