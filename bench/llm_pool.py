"""Calls/s and CPU per call of mathmill's LLM pool vs a plain ``openai.AsyncOpenAI`` loop.

Both run in the same process, against the same fake OpenAI-compatible server (a
separate process answering instantly), alternating rounds so machine noise hits both.

* calls/s of single chat calls at concurrency 1, 64 and 256, and the ratio pool/plain
  (target: >= 0.8 at 256);
* the chain bench: ``--chains`` chains of two structured-output calls (the second
  call's prompt carries the first's reply) through ``LLMClient.structured`` vs the same
  requests from a plain loop (same ``response_format`` body, reply parsed with
  pydantic, an ``asyncio.Semaphore`` bounding the requests in flight), at 64 and 256
  in flight. Prints this process's CPU seconds per call (``time.process_time``; the
  server is another process) and the ratio pool/plain (target: <= 1.15 at 64).

    .venv/bin/python bench/llm_pool.py [--calls 2000] [--rounds 3] [--chains 2000]
    .venv/bin/python bench/llm_pool.py --chain-only   # the chain bench alone
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import openai
from pydantic import BaseModel

from mathmill.llm import EndpointConfig, LLMPool

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


class Step(BaseModel):
    """The chain bench's reply schema."""

    answer: int
    reason: str = ""


# what the fake server answers to every request (valid JSON for Step)
REPLY = '{"answer": 4, "reason": "two and two make four"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mathmill.llm.fake_server",
            "--port",
            str(port),
            "--no-record",
            "--content",
            REPLY,
        ],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{base}/models", timeout=1).close()
            return proc, base
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("fake server did not start")


async def plain(base: str, concurrency: int, calls: int) -> float:
    client = openai.AsyncOpenAI(base_url=base, api_key="EMPTY", max_retries=0)
    per_worker = calls // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            r = await client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
            assert r.choices[0].message.content

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return per_worker * concurrency / elapsed


async def pooled(base: str, concurrency: int, calls: int) -> float:
    n = calls // concurrency * concurrency
    async with LLMPool() as pool:
        client = pool.client(
            EndpointConfig(base_url=base, model="m", max_concurrency=concurrency, max_retries=0)
        )
        start = time.perf_counter()
        results = await asyncio.gather(*(client.chat(MESSAGES) for _ in range(n)))
        elapsed = time.perf_counter() - start
    assert all(r.text for r in results)
    return n / elapsed


def _first(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Problem {i}: what is 2+2? Answer in JSON."}]


def _second(first: list[dict[str, str]], reply: str, value: Step) -> list[dict[str, str]]:
    check = f"Check that {value.answer} is right and answer again in JSON."
    return [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": check}]


async def plain_chains(base: str, concurrency: int, chains: int) -> tuple[float, int]:
    """CPU seconds and calls for ``chains`` two-call chains from a plain SDK loop."""
    cpu = time.process_time()
    client = openai.AsyncOpenAI(base_url=base, api_key="EMPTY", max_retries=0)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "Step", "schema": Step.model_json_schema(), "strict": False},
    }
    bound = asyncio.Semaphore(concurrency)

    async def ask(messages: list[dict[str, str]]) -> tuple[str, Step]:
        async with bound:
            r = await client.chat.completions.create(
                model="m",
                messages=messages,  # type: ignore[arg-type]
                response_format=fmt,  # type: ignore[arg-type]
            )
        text = r.choices[0].message.content or ""
        return text, Step.model_validate_json(text)

    async def chain(i: int) -> Step:
        first = _first(i)
        text, value = await ask(first)
        return (await ask(_second(first, text, value)))[1]

    results = await asyncio.gather(*(chain(i) for i in range(chains)))
    await client.close()
    assert all(r.answer == 4 for r in results)
    return time.process_time() - cpu, 2 * chains


async def pooled_chains(base: str, concurrency: int, chains: int) -> tuple[float, int]:
    """CPU seconds and calls for ``chains`` two-call chains through ``LLMClient.structured``."""
    cpu = time.process_time()
    async with LLMPool() as pool:
        client = pool.client(
            EndpointConfig(base_url=base, model="m", max_concurrency=concurrency, max_retries=2)
        )

        async def chain(i: int) -> Step:
            first = _first(i)
            one = await client.structured(first, Step, stage="first")
            assert one.value is not None
            two = await client.structured(_second(first, one.raw, one.value), Step, stage="second")
            assert two.value is not None
            return two.value

        results = await asyncio.gather(*(chain(i) for i in range(chains)))
        assert pool.meter.total().calls == 2 * chains
    assert all(r.answer == 4 for r in results)
    return time.process_time() - cpu, 2 * chains


def chain_bench(base: str, concurrency: list[int], chains: int, rounds: int) -> None:
    asyncio.run(plain_chains(base, 8, 100))  # warm up both paths
    asyncio.run(pooled_chains(base, 8, 100))
    print(f"chains: {chains} x 2 structured calls x {rounds} rounds (median CPU of this process)")
    print(f"{'in flight':>11} {'plain ms/call':>14} {'pool ms/call':>13} {'ratio':>6}")
    for c in concurrency:
        plain_cpu, pool_cpu = [], []
        for i in range(rounds):
            order = [plain_chains, pooled_chains] if i % 2 == 0 else [pooled_chains, plain_chains]
            for fn in order:
                cpu, calls = asyncio.run(fn(base, c, chains))
                (plain_cpu if fn is plain_chains else pool_cpu).append(cpu / calls)
        p, m = statistics.median(plain_cpu), statistics.median(pool_cpu)
        print(f"{c:>11} {p * 1e3:>14.3f} {m * 1e3:>13.3f} {m / p:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--chains", type=int, default=2000, help="chains per measurement")
    parser.add_argument("--chain-concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--chain-only", action="store_true", help="run the chain bench alone")
    parser.add_argument("--no-chain", action="store_true", help="skip the chain bench")
    args = parser.parse_args()
    proc, base = start_server()
    try:
        if args.chain_only:
            chain_bench(base, args.chain_concurrency, args.chains, args.rounds)
            return
        asyncio.run(plain(base, 8, 200))  # warm up both paths
        asyncio.run(pooled(base, 8, 200))
        print(f"fake server {base}; {args.calls} calls x {args.rounds} rounds (median)")
        print(f"{'concurrency':>11} {'plain calls/s':>14} {'pool calls/s':>13} {'ratio':>6}")
        for c in args.concurrency:
            calls = max(c, args.calls if c > 1 else args.calls // 4)
            p_rates, m_rates = [], []
            for i in range(args.rounds):
                order = [plain, pooled] if i % 2 == 0 else [pooled, plain]
                for fn in order:
                    rate = asyncio.run(fn(base, c, calls))
                    (p_rates if fn is plain else m_rates).append(rate)
            p, m = statistics.median(p_rates), statistics.median(m_rates)
            print(f"{c:>11} {p:>14.0f} {m:>13.0f} {m / p:>6.2f}")
        if not args.no_chain:
            chain_bench(base, args.chain_concurrency, args.chains, args.rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
