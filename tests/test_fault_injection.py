"""Under 30% injected faults every request ends with a result or a recorded error."""

from __future__ import annotations

import asyncio
import time

import pytest

from mathmill.llm import EndpointConfig, LLMPool
from mathmill.llm.fake_server import FakeOpenAIServer, Fault, Reply

FAULTS = [
    Fault.status(429, retry_after=0.05),
    Fault.status(500),
    Fault.status(503, retry_after=0.05),
    Fault.hang(5.0),
    Fault.malformed(),
    Fault.truncated('{"answer": '),
]


@pytest.mark.timeout(120)
async def test_thirty_percent_faults_no_crash_no_hang() -> None:
    n = 300
    with FakeOpenAIServer(
        lambda _r: Reply('{"answer": 4}'), fault_rate=0.3, faults=FAULTS, seed=1234
    ) as fake:
        config = EndpointConfig(
            base_url=fake.base_url,
            model="m",
            timeout_s=0.5,
            max_retries=3,
            max_backoff_s=0.2,
            max_concurrency=32,
        )
        async with LLMPool() as pool:
            client = pool.client(config)
            start = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        client.chat(
                            [{"role": "user", "content": f"q{i}"}],
                            stage="faults",
                            raise_on_error=False,
                        )
                        for i in range(n)
                    )
                ),
                timeout=90,
            )
            elapsed = time.monotonic() - start
    assert len(results) == n
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    # Every request ends one way or the other, with its reason when it failed.
    assert all(r.error is not None and r.error.message for r in failed)
    assert {r.error.kind for r in failed if r.error} <= {"status", "timeout", "bad_response"}
    # With 4 tries each at 30% faults, nearly all succeed (0.3^4 = 0.8% expected failures).
    assert len(ok) >= n * 0.95
    outcomes = fake.outcomes()
    for kind in ("status:429", "status:500", "status:503", "hang", "malformed", "truncated"):
        assert kind in outcomes, kind
    # Retries are visible in the server's log and in the accounting.
    assert len(outcomes) > n
    stage = pool.meter.stages()["faults"]
    assert stage.calls == n
    # Every retry the server saw was counted. A retry can also be counted that the
    # server never recorded: under load a request the client gave up on (0.5 s timeout)
    # may be dropped before the server read its body.
    assert len(outcomes) - n <= stage.retries <= 3 * n
    assert stage.errors == len(failed)
    # Truncated replies are results (finish_reason 'length'), not errors.
    assert any(c.finish_reason == "length" for r in ok for c in r.choices)
    assert elapsed < 90


async def test_retry_after_visible_in_server_log() -> None:
    with FakeOpenAIServer() as fake:
        fake.enqueue(Fault.status(429, retry_after=0.3), Reply("ok"))
        async with LLMPool() as pool:
            await pool.client(
                EndpointConfig(base_url=fake.base_url, model="m", max_backoff_s=5)
            ).chat([{"role": "user", "content": "x"}])
        first, second = fake.requests
    assert first.outcome == "status:429"
    assert second.outcome == "ok"
    assert second.received_at - first.received_at >= 0.29
