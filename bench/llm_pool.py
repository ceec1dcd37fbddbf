"""Calls/s through mathmill's LLM pool vs a plain ``openai.AsyncOpenAI`` loop.

Both run in the same process, against the same fake OpenAI-compatible server (a
separate process answering instantly), at concurrency 1, 64 and 256, alternating
rounds so machine noise hits both. Prints calls/s and the ratio pool/plain
(target: >= 0.8 at 256).

    .venv/bin/python bench/llm_pool.py [--calls 2000] [--rounds 3]
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

from mathmill.llm import EndpointConfig, LLMPool

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mathmill.llm.fake_server", "--port", str(port), "--no-record"],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    args = parser.parse_args()
    proc, base = start_server()
    try:
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
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
