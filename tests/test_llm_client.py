"""The LLM client pool against the fake OpenAI-compatible server (real HTTP)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from pydantic import BaseModel, SecretStr
from tenacity import RetryCallState

from mathmill.errors import EndpointError, EndpointTimeout, StructuredOutputError
from mathmill.llm import EndpointConfig, LLMPool, Price
from mathmill.llm.fake_server import FakeOpenAIServer, Fault, RecordedRequest, Reply
from mathmill.llm.limiter import Limiter
from mathmill.llm.structured import response_format, schema_hint
from mathmill.records import SamplingParams

USER = [{"role": "user", "content": "What is 2+2?"}]


class Answer(BaseModel):
    answer: int
    why: str = ""


def endpoint(fake: FakeOpenAIServer, **kw: object) -> EndpointConfig:
    base = {
        "base_url": fake.base_url,
        "model": "m",
        "timeout_s": 2.0,
        "max_retries": 3,
        "max_backoff_s": 0.5,
    }
    return EndpointConfig(**{**base, **kw})  # type: ignore[arg-type]


async def test_chat_samples_logprobs_and_usage(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Reply(contents=["four", "4", "IV"]))
    async with LLMPool() as pool:
        client = pool.client(endpoint(fake, price=Price(input_per_1m=1.0, output_per_1m=2.0)))
        sampling = SamplingParams(temperature=0.8, n=3, seed=1, logprobs=True, top_logprobs=1)
        result = await client.chat(USER, stage="cot", sampling=sampling)
    assert result.texts == ["four", "4", "IV"]
    assert result.choices[0].logprobs is not None
    assert result.choices[0].logprobs[0].token == "four"
    assert result.attempts == 1
    body = fake.requests[0].body or {}
    assert body["n"] == 3
    assert body["temperature"] == 0.8
    assert body["seed"] == 1
    assert body["logprobs"] is True
    assert body["top_logprobs"] == 1
    assert result.usage.prompt_tokens == 3
    assert result.usage.completion_tokens == 3
    assert result.cost_usd == pytest.approx((3 * 1.0 + 3 * 2.0) / 1e6)
    stage = pool.meter.stages()["cot"]
    assert (stage.calls, stage.prompt_tokens, stage.completion_tokens) == (1, 3, 3)


async def test_text_completions_with_logprobs_and_extra_body(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Reply("a b c"))
    async with LLMPool() as pool:
        client = pool.client(endpoint(fake, extra_body={"top_k": 20}))
        result = await client.complete(
            "1+1=", sampling=SamplingParams(logprobs=True, top_logprobs=2), echo=False
        )
    assert result.text == "a b c"
    assert [t.token for t in result.choices[0].logprobs or []] == ["a", "b", "c"]
    body = fake.requests[0].body or {}
    assert fake.requests[0].path == "/v1/completions"
    assert body["logprobs"] == 2
    assert body["top_k"] == 20
    assert body["echo"] is False


async def test_retry_after_is_honoured(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Fault.status(429, retry_after=0.4), Fault.status(503, retry_after=0.2), Reply("4"))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).chat(USER)
    assert result.text == "4"
    assert result.attempts == 3
    assert fake.outcomes() == ["status:429", "status:503", "ok"]
    t = [r.received_at for r in fake.requests]
    assert t[1] - t[0] >= 0.38
    assert t[2] - t[1] >= 0.18
    assert pool.meter.total().retries == 2


async def test_retry_after_is_capped_by_max_backoff(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Fault.status(429, retry_after=60), Reply("4"))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake, max_backoff_s=0.1)).chat(USER)
    assert result.text == "4"
    assert fake.requests[1].received_at - fake.requests[0].received_at < 5


async def test_hang_times_out_then_retries(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Fault.hang(10), Reply("4"))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake, timeout_s=0.3)).chat(USER)
    assert result.text == "4"
    assert fake.outcomes() == ["hang", "ok"]


async def test_malformed_body_is_retried(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Fault.malformed(), Reply("4"))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).chat(USER)
    assert result.text == "4"
    assert result.attempts == 2


async def test_client_errors_are_not_retried(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Fault.status(400), Reply("never"))
    async with LLMPool() as pool:
        with pytest.raises(EndpointError, match="HTTP 400 after 1 attempt") as info:
            await pool.client(endpoint(fake)).chat(USER)
    assert info.value.status == 400
    assert fake.outcomes() == ["status:400"]


async def test_exhausted_retries_raise_or_are_recorded(fake: FakeOpenAIServer) -> None:
    fake.enqueue(*[Fault.status(500)] * 3)
    async with LLMPool() as pool:
        client = pool.client(endpoint(fake, max_retries=2))
        with pytest.raises(EndpointError, match="HTTP 500 after 3 attempts"):
            await client.chat(USER)
        fake.enqueue(*[Fault.hang(5)] * 3)
        impatient = pool.client(endpoint(fake, max_retries=2, timeout_s=0.2))
        result = await impatient.chat(USER, stage="solve", raise_on_error=False)
    assert not result.ok
    assert result.text == ""
    assert result.error is not None
    assert result.error.kind == "timeout"
    assert result.error.attempts == 3
    assert result.error.stage == "solve"
    assert pool.meter.stages()["solve"].errors == 1


async def test_dead_endpoint_is_a_connection_error() -> None:
    async with LLMPool() as pool:
        client = pool.client(
            EndpointConfig(
                base_url="http://127.0.0.1:9/v1",
                model="m",
                max_retries=1,
                max_backoff_s=0.1,
                timeout_s=2,
            )
        )
        with pytest.raises(EndpointError, match="cannot connect after 2 attempts") as info:
            await client.chat(USER)
    assert info.value.kind == "connection"
    assert not isinstance(info.value, EndpointTimeout)


async def test_concurrency_is_bounded_per_endpoint(fake: FakeOpenAIServer) -> None:
    in_flight = 0
    peak = 0
    lock = asyncio.Lock()

    fake.handler = lambda _r: Reply("4", delay_s=0.05)
    original = fake._answer

    async def counting(*args: object) -> None:
        nonlocal in_flight, peak
        async with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            await original(*args)  # type: ignore[arg-type]
        finally:
            async with lock:
                in_flight -= 1

    fake._answer = counting  # type: ignore[method-assign]
    async with LLMPool() as pool:
        # Two roles on the same endpoint share one client and so one limit.
        a = pool.client(endpoint(fake, max_concurrency=4))
        b = pool.client(endpoint(fake, max_concurrency=4))
        assert a is b
        results = await asyncio.gather(*(a.chat(USER) for _ in range(40)))
    assert all(r.ok for r in results)
    assert 2 <= peak <= 4


async def test_structured_json_schema_request(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Reply('{"answer": 4, "why": "2+2"}'))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).structured(USER, Answer)
    assert result.value == Answer(answer=4, why="2+2")
    assert not result.repaired
    fmt = (fake.requests[0].body or {})["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"]["required"] == ["answer"]


async def test_structured_json_object_mode_sends_schema_and_tolerates_fences(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue(Reply('Here you go:\n```json\n{"answer": 4, "why": "line one\nline two"}\n```'))
    async with LLMPool() as pool:
        client = pool.client(endpoint(fake, structured_mode="json_object"))
        result = await client.structured(USER, Answer)
    assert result.value == Answer(answer=4, why="line one\nline two")
    body = fake.requests[0].body or {}
    assert body["response_format"]["type"] == "json_object"
    assert body["response_format"]["schema"]["properties"]["answer"]["type"] == "integer"
    assert "JSON schema" in body["messages"][0]["content"]


async def test_structured_repairs_once(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Fault.truncated('{"answer": 4, "wh'), Reply('{"answer": 4}'))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).structured(USER, Answer, stage="label")
    assert result.value == Answer(answer=4)
    assert result.repaired
    repair = fake.requests[1].messages
    assert repair[-2] == {"role": "assistant", "content": '{"answer": 4, "wh'}
    assert "could not be used" in repair[-1]["content"]
    assert pool.meter.stages()["label"].calls == 2
    assert result.result.usage.completion_tokens > 0


async def test_structured_failure_is_recorded_or_raised(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Reply("no json here"), Reply('{"answer": "four"}'))
    async with LLMPool() as pool:
        client = pool.client(endpoint(fake))
        result = await client.structured(USER, Answer, raise_on_error=False)
        assert result.value is None
        assert result.error is not None
        assert result.error.kind == "invalid_json"
        assert "answer" in result.error.message
        assert result.raw == '{"answer": "four"}'
        fake.enqueue(Reply("nope"), Reply("still nope"))
        with pytest.raises(StructuredOutputError, match="after one repair"):
            await client.structured(USER, Answer)


async def test_api_key_is_sent_but_never_shown(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = endpoint(fake, api_key=SecretStr("sk-very-secret"))
    assert "sk-very-secret" not in repr(cfg)
    assert "sk-very-secret" not in cfg.model_dump_json()
    fake.enqueue(Fault.status(500), Reply("ok"))
    async with LLMPool() as pool:
        await pool.client(cfg).chat(USER)
    assert fake.requests[0].headers["authorization"] == "Bearer sk-very-secret"
    assert "sk-very-secret" not in caplog.text


async def test_handler_sees_the_request(fake: FakeOpenAIServer) -> None:
    def handler(request: RecordedRequest) -> Reply:
        return Reply(request.messages[-1]["content"].upper())

    fake.handler = handler
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).chat([{"role": "user", "content": "echo"}])
    assert result.text == "ECHO"


def test_schema_is_cached_and_callers_cannot_corrupt_it() -> None:
    class Probe(BaseModel):
        n: int
        label: str = ""

    expected = Probe.model_json_schema()
    for mode in ("json_schema", "json_object"):
        first = response_format(Probe, mode)  # type: ignore[arg-type]
        schema = first["json_schema"]["schema"] if mode == "json_schema" else first["schema"]
        assert schema == expected
        schema["properties"].clear()  # a caller changing what it got...
        first["type"] = "text"
        again = response_format(Probe, mode)  # type: ignore[arg-type]
        assert again is not first
        assert again["type"] == mode  # ...changes nothing for the next call
        got = again["json_schema"]["schema"] if mode == "json_schema" else again["schema"]
        assert got == expected
    assert schema_hint(Probe) is schema_hint(Probe)
    assert json.dumps(expected, separators=(",", ":")) in schema_hint(Probe)


async def test_a_request_after_a_caller_changed_its_format_sends_the_whole_schema(
    fake: FakeOpenAIServer,
) -> None:
    response_format(Answer, "json_schema")["json_schema"]["schema"].clear()
    fake.enqueue(Reply('{"answer": 4}'), Reply('{"answer": 5}'))
    async with LLMPool() as pool:
        client = pool.client(endpoint(fake))
        assert (await client.structured(USER, Answer)).value == Answer(answer=4)
        assert (await client.structured(USER, Answer)).value == Answer(answer=5)
    for request in fake.requests:
        fmt = (request.body or {})["response_format"]
        assert fmt["json_schema"]["schema"] == Answer.model_json_schema()


async def test_first_attempt_success_counts_one_attempt(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Reply("4"))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).chat(USER, stage="s")
    assert (result.text, result.attempts) == ("4", 1)
    stage = pool.meter.stages()["s"]
    assert (stage.calls, stage.retries, stage.errors) == (1, 0, 0)


async def test_429_with_retry_after_then_success_counts_two_attempts(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue(Fault.status(429, retry_after=0.3), Reply("4"))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).chat(USER, stage="s")
    assert (result.text, result.attempts) == ("4", 2)
    assert fake.outcomes() == ["status:429", "ok"]
    assert fake.requests[1].received_at - fake.requests[0].received_at >= 0.28
    assert pool.meter.stages()["s"].retries == 1


async def test_backoff_counts_the_first_attempt(fake: FakeOpenAIServer) -> None:
    """Without Retry-After the exponential backoff is asked for attempts 1, 2, ... (the
    bare first attempt counts as tenacity's first).
    """
    fake.enqueue(Fault.status(500), Fault.status(502), Reply("4"))
    seen: list[int] = []
    async with LLMPool() as pool:
        client = pool.client(endpoint(fake))
        backoff = client._backoff

        def spy(state: RetryCallState) -> float:
            seen.append(state.attempt_number)
            assert 0.25 <= backoff(state) <= 0.5  # multiplier 0.25 x 2^(n-1) + jitter, capped
            return 0.0

        client._backoff = spy  # type: ignore[assignment]
        result = await client.chat(USER)
    assert (result.text, result.attempts) == ("4", 3)
    assert seen == [1, 2]


async def test_non_retryable_400_fails_after_one_attempt(fake: FakeOpenAIServer) -> None:
    fake.enqueue(Fault.status(400), Reply("never"))
    async with LLMPool() as pool:
        result = await pool.client(endpoint(fake)).chat(USER, stage="s", raise_on_error=False)
    assert not result.ok
    assert result.attempts == 1
    assert result.error is not None and result.error.attempts == 1
    assert result.error.status == 400
    assert fake.outcomes() == ["status:400"]
    stage = pool.meter.stages()["s"]
    assert (stage.calls, stage.errors, stage.retries) == (1, 1, 0)


async def test_retryable_failure_without_retries_fails_after_one_attempt(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue(Fault.status(503), Reply("never"))
    async with LLMPool() as pool:
        with pytest.raises(EndpointError, match="HTTP 503 after 1 attempt") as info:
            await pool.client(endpoint(fake, max_retries=0)).chat(USER)
    assert info.value.attempts == 1
    assert fake.outcomes() == ["status:503"]


async def test_limiter_with_many_waiters_keeps_its_bound_and_order() -> None:
    limit = Limiter(3)
    order: list[int] = []
    peak = 0

    async def hold(i: int) -> None:
        nonlocal peak
        async with limit:
            order.append(i)
            peak = max(peak, limit.in_flight)
            await asyncio.sleep(0)

    await asyncio.gather(*(hold(i) for i in range(200)))
    assert order == list(range(200))  # first come, first served
    assert peak == 3
    assert limit.in_flight == 0 and limit._woken == 0 and not limit._waiters


async def test_requests_are_those_the_sdk_methods_send(fake: FakeOpenAIServer) -> None:
    """The client posts its bodies without the SDK's typed walk: the server gets the
    same JSON and headers as from ``chat.completions.create`` / ``completions.create``,
    and a body that is not plain JSON still goes through the typed method.
    """
    import openai

    from mathmill.llm.client import _send

    sdk = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
    chat = {
        "model": "m",
        "temperature": 0.8,
        "max_tokens": 5,
        "logprobs": True,
        "top_logprobs": 2,
        "messages": [{"role": "system", "content": "s"}, *USER],
        "response_format": {"type": "json_object"},
        "extra_headers": {"X-Mathmill-Stage": "sample"},
        "extra_body": {"prompt_logprobs": 1},
    }
    text = {"model": "m", "prompt": "2+2=", "max_tokens": 3, "logprobs": 1, "echo": True}
    odd = {**chat, "messages": tuple(USER)}  # not plain JSON: the typed path
    got = []
    try:
        for kind, body in (("chat", chat), ("completions", text), ("chat", odd)):
            method = sdk.chat.completions if kind == "chat" else sdk.completions
            typed = await method.create(**body)  # type: ignore[call-overload]
            posted = await _send(sdk, kind, dict(body))
            assert type(posted) is type(typed)
            assert posted.choices == typed.choices
            got.append(kind)
    finally:
        await sdk.close()
    assert got == ["chat", "completions", "chat"]
    volatile = {"idempotency-key", "x-stainless-retry-count", "x-stainless-read-timeout"}
    for typed_req, posted_req in zip(fake.requests[::2], fake.requests[1::2], strict=True):
        assert posted_req.path == typed_req.path
        assert posted_req.body == typed_req.body
        heads = [
            {k.lower(): v for k, v in r.headers.items() if k.lower() not in volatile}
            for r in (typed_req, posted_req)
        ]
        assert heads[0] == heads[1]
        assert heads[1]["authorization"] == "Bearer sk-test"
