"""Synthesize throughput and Prefect's share of it.

Runs the synthesize pipeline against a fake OpenAI server with instant, scripted
answers (tests/synth_world.py) and the real local sandbox, twice per repeat: as the
Prefect flow (a real local Prefect server, started before timing) and as the same
stages called as plain functions (``run_synthesize(prefect=False)``). Each run gets a
fresh run directory, so nothing is cached. Prints rows/s for both, the Prefect task
runs per 1,000 rows and Prefect's overhead as a share of the flow's wall time.

Targets: <= 20 task runs per 1,000 rows; overhead <= 10% of wall time.

    .venv/bin/python bench/synthesize.py [--rows 1000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathmill.flows.synthesize import SynthesizeParams, run_synthesize, synthesize
from mathmill.llm.fake_server import FakeOpenAIServer
from tests.synth_world import SynthWorld

ROWS_PER_TOPIC = 10  # 2 problems x (1 long + 4 short CoTs)
KINDS = ("ok", "ok", "ok", "fix", "stuck", "crash", "leak", "noanswer")


def config(base_url: str, out: str, rows: int, chunk_size: int) -> SynthesizeParams:
    return SynthesizeParams.model_validate(
        {
            "out": out,
            "topics": -(-rows // ROWS_PER_TOPIC),
            "problems_per_topic": 2,
            "short_cots": 4,
            "rounds": 1,
            "chunk_size": chunk_size,
            "concurrency": 64,
            "chunk_concurrency": 4,
            "models": {"default": {"base_url": base_url, "model": "fake", "max_concurrency": 64}},
            "sandbox": {"timeout_s": 5.0},
        }
    )


async def count_task_runs(flow_run_id: object) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    total = 0
    async with get_client() as client:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        while page := await client.read_task_runs(flow_run_filter=flt, limit=200, offset=total):
            total += len(page)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="final rows (CoTs) per run")
    parser.add_argument("--chunk-size", type=int, default=50, help="problems per chunk")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each kind (best kept)")
    args = parser.parse_args()

    from prefect.logging import disable_run_logger
    from prefect.settings import (
        PREFECT_LOGGING_LEVEL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    logging.getLogger("mathmill").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="mathmill-bench-synth-"))
    world = SynthWorld(kinds=KINDS)
    print(f"cores: {os.cpu_count()}; rows per run: {args.rows}; chunk: {args.chunk_size} problems")
    print("starting a local Prefect server (not timed)...", flush=True)
    with (
        temporary_settings(
            {
                PREFECT_SERVER_ANALYTICS_ENABLED: False,
                PREFECT_LOGGING_LEVEL: "WARNING",
                PREFECT_RESULTS_LOCAL_STORAGE_PATH: work / "results",
            }
        ),
        prefect_test_harness(server_startup_timeout=90),
        FakeOpenAIServer(world, record=False) as fake,
        disable_run_logger(),
    ):
        plain_s: list[float] = []
        flow_s: list[float] = []
        task_runs: list[int] = []
        rows = 0
        for i in range(args.repeat):
            cfg = config(fake.base_url, str(work / f"plain-{i}"), args.rows, args.chunk_size)
            start = time.perf_counter()
            plain = asyncio.run(run_synthesize(cfg, prefect=False))
            plain_s.append(time.perf_counter() - start)
            rows = plain.verified + plain.unverified

            cfg = config(fake.base_url, str(work / f"flow-{i}"), args.rows, args.chunk_size)
            start = time.perf_counter()
            state = asyncio.run(synthesize(params=cfg, return_state=True))
            flow_s.append(time.perf_counter() - start)
            result = state.result()  # type: ignore[union-attr]
            assert result.verified + result.unverified == rows, "the two modes disagree"
            task_runs.append(asyncio.run(count_task_runs(state.state_details.flow_run_id)))
            print(
                f"  run {i + 1}: plain {plain_s[-1]:.1f}s, flow {flow_s[-1]:.1f}s, "
                f"{task_runs[-1]} task runs",
                flush=True,
            )
    best_plain, best_flow = min(plain_s), min(flow_s)
    overhead = (best_flow - best_plain) / best_flow
    per_1000 = task_runs[-1] * 1000 / rows
    print()
    print(f"rows per run:                  {rows} ({result.verified} verified)")
    print(f"LLM calls per run:             {int(result.usage['total']['calls'])}")
    print(f"plain stages:                  {rows / best_plain:7.1f} rows/s ({best_plain:.1f}s)")
    print(f"Prefect flow:                  {rows / best_flow:7.1f} rows/s ({best_flow:.1f}s)")
    print(f"task runs per 1,000 rows:      {per_1000:7.1f}   (target <= 20)")
    print(f"Prefect overhead of wall time: {overhead:7.1%}   (target <= 10%)")


if __name__ == "__main__":
    main()
