"""Live concurrency: the requests in flight at the (fake) endpoint follow a Prefect
global concurrency limit changed mid-run, from the CLI and from the API.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mathmill.flows.options import ModelRole
from mathmill.flows.resources import open_runtime
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from mathmill.llm.limiter import Limiter
from mathmill.storage import StorageConfig

DELAY_S = 0.25  # every fake answer takes this long, so requests pile up in flight


def _slow(request: RecordedRequest) -> Reply:
    return Reply("ok", delay_s=DELAY_S)


async def _gcl(name: str) -> int:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).limit


async def _set_gcl(name: str, limit: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    async with get_client() as client:
        await client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(limit=limit)
        )


@pytest.mark.slow
async def test_changing_the_limit_mid_run_changes_requests_in_flight(
    prefect_api: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATHMILL_LIVE_POLL_S", "0.2")
    name = f"llm-test-{uuid.uuid4().hex[:8]}"
    with FakeOpenAIServer(_slow) as fake:
        role = ModelRole(
            base_url=fake.base_url,
            model="fake-model",
            max_concurrency=2,
            concurrency_limit=name,
            max_retries=0,
        )
        async with open_runtime(
            StorageConfig(url=str(tmp_path)), {"solver": role}, sandbox=None, row_concurrency=16
        ) as rt:
            assert await _gcl(name) == 2  # created from max_concurrency, visible in the UI
            client = rt.pool.client(rt.endpoints["solver"])
            stop = asyncio.Event()

            async def worker(w: int) -> int:
                done = 0
                while not stop.is_set():  # distinct prompts: the call cache replays repeats
                    prompt = f"worker {w} request {done}"
                    await client.chat([{"role": "user", "content": prompt}], stage="live")
                    done += 1
                return done

            workers = [asyncio.create_task(worker(w)) for w in range(12)]
            t0 = time.monotonic()
            await asyncio.sleep(1.5)
            # the documented way: the Prefect CLI, while the run goes on
            t1 = time.monotonic()
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "prefect",
                "global-concurrency-limit",
                "update",
                name,
                "--limit",
                "6",
                env={**os.environ, **prefect_api},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            output, _ = await cli.communicate()
            assert cli.returncode == 0, output.decode()
            t2 = time.monotonic()
            await asyncio.sleep(1.5)
            t3 = time.monotonic()
            await _set_gcl(name, 3)  # and through the API (as the UI does)
            t4 = time.monotonic()
            await asyncio.sleep(1.5)
            t5 = time.monotonic()
            stop.set()
            done = sum(await asyncio.gather(*workers))
    settle = 0.2 + 0.2 + DELAY_S  # one poll, slack, and the requests already in flight
    before = fake.peak_in_flight(t0 + 0.3, t1)
    after_raise = fake.peak_in_flight(t2 + settle, t3)
    after_lower = fake.peak_in_flight(t4 + settle, t5)
    measured = f"in flight: {before} -> {after_raise} -> {after_lower} ({done} requests)"
    assert (before, after_raise, after_lower) == (2, 6, 3), measured
    assert done == len(fake.requests)


@pytest.mark.slow
async def test_an_inactive_limit_falls_back_and_a_missing_api_keeps_the_capacity(
    prefect_api: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from mathmill.llm.client import LLMPool
    from mathmill.llm.config import EndpointConfig
    from mathmill.llm.live import LiveLimits

    name = f"llm-test-{uuid.uuid4().hex[:8]}"
    endpoint = EndpointConfig(
        base_url="http://127.0.0.1:9/v1", model="m", max_concurrency=5, concurrency_limit=name
    )
    async with LLMPool() as pool, LiveLimits(pool, [endpoint], poll_s=60) as live:
        client = pool.client(endpoint)
        await _set_gcl(name, 9)
        await live.refresh()
        assert client.limiter.capacity == 9
        async with get_client() as api:
            await api.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(active=False)
            )
        await live.refresh()
        assert client.limiter.capacity == 5  # inactive: the endpoint's own max_concurrency
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
            await live.refresh()  # unreachable: warns, keeps the capacity
        assert client.limiter.capacity == 5
        assert live.changes == [(name, 9), (name, 5)]


@pytest.mark.timeout(20)
async def test_limiter_grows_shrinks_and_pauses() -> None:
    limit = Limiter(1)
    peak = 0
    release = asyncio.Event()

    async def hold() -> None:
        nonlocal peak
        async with limit:
            peak = max(peak, limit.in_flight)
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert (limit.in_flight, peak) == (1, 1)
    limit.resize(4)
    await asyncio.sleep(0.05)
    assert limit.in_flight == 4  # waiters woke at once
    limit.resize(0)  # pause: holders finish, nobody new starts
    release.set()
    await asyncio.sleep(0.05)
    assert limit.in_flight == 0 and sum(t.done() for t in tasks) == 4
    limit.resize(2)
    await asyncio.gather(*tasks)
    assert limit.in_flight == 0


@pytest.mark.timeout(20)
async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    limit = Limiter(1)
    gate = asyncio.Event()

    async def hold() -> str:
        async with limit:
            await gate.wait()
        return "done"

    first = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    second = asyncio.create_task(hold())
    third = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    gate.set()
    second.cancel()  # woken or not, cancelling must not eat the slot
    assert await first == "done" and await third == "done"
    assert second.cancelled() and limit.in_flight == 0
