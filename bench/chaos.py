"""The crash campaign: ``kill -9`` of ``mathmill run synthesize|tir|sample`` at random
points, then the same command again; the re-run must write the rows of an
uninterrupted run (none lost or doubled) and pay for no finished LLM call twice.

Per pipeline: one uninterrupted run (the reference rows), then ``--kills`` kill points
(seeded): one in five during start-up, before any request is answered, the others
after a random number of answered requests between the first and the last of a full
run. Fake OpenAI servers answer at once; a temporary Prefect server records the runs.
Prints a table per pipeline and exits 1 if any kill point failed. The logic lives in
tests/chaos_support.py (also run by tests/test_crash_campaign.py).

    .venv/bin/python bench/chaos.py [--kills 20] [--seed 0] [--pipelines synthesize,tir,sample]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos_support import campaign, pipelines, prefect_server, run_env, table


def log(line: str) -> None:
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=20, help="kill points per pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipelines", default="synthesize,tir,sample")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mathmill-chaos-"))
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    chosen = [p for p in pipelines(work / "inputs") if p.name in names]
    with prefect_server(work / "prefect-results") as api:
        reports = campaign(chosen, work, run_env(api), kills=args.kills, seed=args.seed, log=log)
    print()
    print(f"crash campaign: {args.kills} kill points per pipeline, seed {args.seed}")
    print(table(reports))
    failed = [(r.pipeline, o) for r in reports for o in r.failed]
    for name, outcome in failed:
        print(f"FAILED {name} {outcome.point}: {outcome.problem}")
    print(f"{time.monotonic() - started:.0f}s in all")
    if args.keep:
        print(f"run directories in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
