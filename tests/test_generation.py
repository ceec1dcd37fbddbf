"""Batch generation without vLLM: the endpoint backend over real HTTP (the fake server
speaks vLLM's extras), request chunks and resume, backend validation, and the sample
flow on the endpoint backend; a missing generate deployment is a clear error.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mathmill.errors import ConfigError
from mathmill.llm.cache import CallCache
from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from mathmill.records import GenRequest, SamplingParams
from mathmill.storage import RunStore
from mathmill.tasks.generation import GenBackend, endpoint_generate, write_requests

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "tests" / "data" / "problems" / "amc23_5.jsonl"


def _generate(
    fake: FakeOpenAIServer, requests: list[GenRequest], cache: CallCache | None = None
) -> Any:
    async def go() -> Any:
        async with LLMPool(cache=cache) as pool:
            client = pool.client(EndpointConfig(base_url=fake.base_url, model="m", max_retries=0))
            return await endpoint_generate(client, requests, "t", 4)

    return asyncio.run(go())


def test_endpoint_backend_sends_vllm_extras_and_reads_them_back(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    chat = GenRequest(
        id="a",
        messages=[{"role": "user", "content": "one two three four"}],
        prompt_logprobs=1,
        json_schema={"type": "object"},
        sampling=SamplingParams(n=2, temperature=0.5, logprobs=True, top_logprobs=1),
    )
    text = GenRequest(
        id="b", prompt="alpha beta gamma", prompt_logprobs=0, json_schema={"type": "object"}
    )
    cache = CallCache(str(tmp_path / "calls.sqlite"))
    got_chat, got_text = _generate(fake, [chat, text], cache)
    bodies = {
        r.body["messages"][0]["content"] if "messages" in r.body else r.body["prompt"]: r.body
        for r in fake.requests
        if r.body
    }
    sent_chat, sent_text = bodies["one two three four"], bodies["alpha beta gamma"]
    assert sent_chat["prompt_logprobs"] == 1 and sent_chat["return_token_ids"] is True
    assert sent_chat["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert sent_chat["n"] == 2 and sent_chat["logprobs"] is True and sent_chat["top_logprobs"] == 1
    assert sent_text["structured_outputs"] == {"json": {"type": "object"}}
    assert "response_format" not in sent_text
    # the prompt's own token (rank 2) is picked by its id, the better one is in `top`
    lp = got_chat.prompt_logprobs
    assert [t.token for t in lp] == [" two", " three", " four"]
    assert [t.token_id for t in lp] == [101, 102, 103] and all(t.logprob == -0.5 for t in lp)
    assert lp[0].top == {"<best>": -0.1}
    assert [t.token for t in got_text.prompt_logprobs] == [" beta", " gamma"]
    assert got_text.prompt_logprobs[0].top == {}
    assert len(got_chat.choices) == 2 and got_chat.backend == "http"
    assert all(c.logprobs and c.tokens == len(c.logprobs) for c in got_chat.choices)
    # replayed from the call cache with everything, nothing sent
    sent = len(fake.requests)
    again = _generate(fake, [chat, text], cache)
    assert len(fake.requests) == sent
    assert again[0].prompt_logprobs == got_chat.prompt_logprobs and again[0].texts == got_chat.texts


def test_an_endpoint_error_is_recorded_on_the_row(fake: FakeOpenAIServer) -> None:
    def handler(request: RecordedRequest) -> Any:
        from mathmill.llm.fake_server import Fault

        return Fault("status", code=400)

    fake.handler = handler
    [gen] = _generate(fake, [GenRequest(id="x", prompt="p", prompt_logprobs=1)])
    assert gen.error is not None and gen.error.status == 400 and not gen.error.transient
    assert "HTTP 400" in gen.error.message and gen.error.stage == "t"


def test_requests_are_chunked_by_content_and_ids_must_be_unique(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path))
    reqs = [GenRequest(id=str(i), prompt=f"p{i}") for i in range(5)]
    refs = write_requests(store, "gen", reqs, 2)
    assert [r.rows for r in refs] == [2, 2, 1]
    assert [r.key for r in write_requests(store, "gen", reqs, 2)] == [r.key for r in refs]
    changed = write_requests(store, "gen", [*reqs[:4], GenRequest(id="4", prompt="other")], 2)
    assert [r.key for r in changed][:2] == [r.key for r in refs][:2] and changed[2].key != refs[
        2
    ].key
    with pytest.raises(ConfigError, match="unique"):
        write_requests(store, "gen", [reqs[0], reqs[0]], 2)


def test_request_and_backend_validation() -> None:
    with pytest.raises(ValidationError, match="exactly one of prompt and messages"):
        GenRequest(id="x")
    with pytest.raises(ValidationError, match="needs engine"):
        GenBackend(kind="deployment")
    assert GenBackend().kind == "endpoint"


def test_sample_flow_on_an_endpoint_resumes_without_calls(
    fake: FakeOpenAIServer, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.flows.sample import SampleParams, sample

    def handler(request: RecordedRequest) -> Reply:
        n = int((request.body or {}).get("n") or 1)
        return Reply(contents=[f"so the answer is \\boxed{{{i}}}" for i in range(n)])

    fake.handler = handler
    params = SampleParams(
        input=str(PROBLEMS),
        out=str(tmp_path / "run"),
        samples=3,
        model={"base_url": fake.base_url, "model": "m"},  # type: ignore[arg-type]
        backend=GenBackend(chunk_size=2),
    )
    result = asyncio.run(sample(params))
    assert result.problems == 5 and result.samples == 15
    rows = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {r["final_answer"] for r in rows} == {"0", "1", "2"}
    assert all(
        r["logprobs"] and r["sampling"]["n"] == 3 and r["sampling"]["logprobs"] for r in rows
    )
    answers = {json.loads(x)["answer"] for x in PROBLEMS.read_text().splitlines()}
    correct = sum(r["status"] == "correct" for r in rows)
    assert correct == 3 * len(answers & {"0", "1", "2"})
    assert len(fake.requests) == 5  # one request per problem, n samples in it
    again = asyncio.run(sample(params))
    assert len(fake.requests) == 5 and again.samples == 15


def test_a_missing_generate_deployment_is_a_clear_error(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.flows.sample import SampleParams, sample
    from mathmill.llm.vllm_engine import EngineConfig

    params = SampleParams(
        input=str(PROBLEMS),
        out=str(tmp_path / "run"),
        backend=GenBackend(
            kind="deployment", engine=EngineConfig(model="/models/x"), deployment="generate/nope"
        ),
    )
    with pytest.raises(ConfigError, match="no deployment 'generate/nope' on the Prefect server"):
        asyncio.run(sample(params))


def test_a_server_that_ignores_n_is_asked_again_for_the_rest(fake: FakeOpenAIServer) -> None:
    """llama.cpp answers one choice whatever n is: the backend asks for the missing
    samples, each call with its own seed, and counts every call's tokens.
    """
    seen: list[dict[str, Any]] = []

    def handler(request: RecordedRequest) -> Reply:
        seen.append(request.body or {})
        return Reply(contents=[f"sample with seed {(request.body or {}).get('seed')}"])

    fake.handler = handler
    sampling = SamplingParams(n=3, temperature=0.7, seed=10)
    [gen] = _generate(fake, [GenRequest(id="q", prompt="two words", sampling=sampling)])
    assert [c.index for c in gen.choices] == [0, 1, 2]
    assert gen.texts == ["sample with seed 10", "sample with seed 11", "sample with seed 12"]
    assert [b.get("n", 1) for b in seen] == [3, 2, 1]
    assert all(c.tokens == 4 for c in gen.choices)
    assert gen.usage.completion_tokens == 12 and gen.error is None


def test_sample_flow_keeps_going_past_a_malformed_row(
    fake: FakeOpenAIServer, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    """A line that is not JSON goes to dropped.jsonl with its file and line; the other
    problems are sampled and the statistics count the dropped row.
    """
    from mathmill.flows.sample import SampleParams, sample

    source = tmp_path / "in.jsonl"
    good = [json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in (1, 2)]
    source.write_text(f"{good[0]}\nnot json\n{good[1]}\n")
    fake.handler = lambda request: Reply(contents=["\\boxed{2}"])
    params = SampleParams(
        input=str(source),
        out=str(tmp_path / "run"),
        samples=1,
        model={"base_url": fake.base_url, "model": "m"},  # type: ignore[arg-type]
    )
    result = asyncio.run(sample(params))
    assert result.problems == 2 and result.samples == 2
    assert result.stats["dropped input rows"] == 1
    [dropped] = [
        json.loads(x) for x in (tmp_path / "run" / "dropped.jsonl").read_text().splitlines()
    ]
    assert dropped["reason"] == "malformed_row" and "in.jsonl:2" in dropped["detail"]
    statuses = sorted(
        json.loads(x)["status"]
        for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    )
    assert statuses == ["correct", "incorrect"]
