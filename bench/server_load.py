"""The local Prefect server under load, on PostgreSQL and on SQLite.

For each database: `mathmill server up` (PostgreSQL: a fresh cluster from Debian's
``postgresql``, tests/postgres_support.py, or ``--postgres-url``), the deployments of
deployments/prefect.yaml, the fake LLM endpoint as a block, W process workers on the
cpu pool (``--limit L`` each); R ``sample/sample`` runs submitted at once against the
fake server (tests/load_support.py). Prints, per database: flow runs/min (first
submission to last end, server timestamps), the time from submission to running,
the latency p50/p99 of the API calls made while the runs go (the 20 submissions;
then, in a loop, ``read_flow_runs`` of the batch, ``read_task_runs`` of one run,
``create_flow_run`` of a record), task runs recorded vs expected, and the server
log's errors (the requests it answered 503 on a locked database, retried by clients).

``sqlite-stock`` is SQLite with Prefect's transactions as they come
(MATHMILL_SQLITE_TURNS=0, see mathmill/prefect_server.py), for comparison.

    .venv/bin/python bench/server_load.py [--databases postgresql,sqlite,sqlite-stock]
        [--runs 20] [--problems 8] [--workers 3] [--limit 4] [--rounds 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.load_support import Load, LoadReport, retried, run_load
from tests.postgres_support import Postgres, running_postgres

CHOICES = ("postgresql", "sqlite", "sqlite-stock")
_cluster: list[Postgres] = []


def one(kind: str, load: Load, args: argparse.Namespace, stack: ExitStack, n: int) -> LoadReport:
    work = Path(tempfile.mkdtemp(prefix=f"mm-server-load-{kind}-"))
    database, extra = None, {}
    if kind == "postgresql":
        if args.postgres_url:
            database = args.postgres_url
        else:  # one cluster for the bench, a fresh database per round
            if not _cluster:
                _cluster.append(stack.enter_context(running_postgres()))
            database = _cluster[0].create_database(f"load{n}")
    elif kind == "sqlite-stock":
        extra = {"MATHMILL_SQLITE_TURNS": "0"}
    try:
        report, _ = run_load(work, load, database, kind, args.workers, args.limit, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--databases", default="postgresql,sqlite,sqlite-stock")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--problems", type=int, default=8, help="per run (one task each)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--limit", type=int, default=4, help="flow runs per worker at once")
    parser.add_argument("--rounds", type=int, default=1, help="loads per database")
    parser.add_argument("--postgres-url", help="an existing database (else a fresh cluster)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    if bad := [k for k in kinds if k not in CHOICES]:
        parser.error(f"--databases: unknown {bad}; choose from {', '.join(CHOICES)}")
    load = Load(runs=args.runs, problems=args.problems, chunk=1, samples=args.samples)
    print(
        f"{load.runs} sample/sample runs at once, {load.problems} problems each in "
        f"{load.tasks_per_run} task runs; {args.workers} workers x {args.limit} runs"
    )
    figures = []
    with ExitStack() as stack:
        for r in range(args.rounds):
            for kind in kinds:
                started = time.perf_counter()
                report = one(kind, load, args, stack, r)
                print("\n".join(report.lines()), flush=True)
                print(f"  ({time.perf_counter() - started:.0f}s with setup)", flush=True)
                p50, p99, n = report.percentiles("all")
                figures.append(
                    {
                        "database": kind,
                        "round": r,
                        "runs": report.runs,
                        "completed": report.completed,
                        "runs_per_min": round(report.runs_per_min, 2),
                        "api_p50_ms": round(p50, 1),
                        "api_p99_ms": round(p99, 1),
                        "api_calls": n,
                        "by_call": {
                            k: [round(x, 1) for x in report.percentiles(k)[:2]]
                            for k in report.latency_ms
                        },
                        "task_runs": report.task_runs,
                        "task_runs_expected": report.task_runs_expected,
                        "answered_503": retried(report.server_errors),
                        "server_errors": dict(report.server_errors),
                    }
                )
    print("\nsummary")
    print(
        f"{'database':<14}{'runs/min':>9}{'API p50 ms':>12}{'API p99 ms':>12}"
        f"{'task runs':>12}{'503s':>6}"
    )
    for f in figures:
        tasks = f"{f['task_runs']}/{f['task_runs_expected']}"
        print(
            f"{f['database']:<14}{f['runs_per_min']:>9.1f}{f['api_p50_ms']:>12.1f}"
            f"{f['api_p99_ms']:>12.1f}{tasks:>12}{f['answered_503']:>6}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
