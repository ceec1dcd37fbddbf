"""Grader agreement per source on the labelled pairs, and comparisons per second.

Targets: >= 99% agreement on the rows kept (the deliberate disagreements are listed in
tests/test_grading.py); >= 1,000 comparisons/s on 2 cores. Speed is measured twice:
on the labelled pairs (many are whole model outputs, matrices and LaTeX), and on
short final answers of the kind the pipelines compare (GSM8K answers against
reformatted predictions), each in one process and in a pool of one process per core.

    .venv/bin/python bench/grading.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathmill.grading import grade
from tests.test_grading import DISAGREE, ROWS, options

CORES = os.cpu_count() or 1
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def short_pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()]
    pairs = []
    for row in rows:
        a = row["answer"]
        n = int(a.replace(",", ""))
        pairs += [
            (a, a),
            (a, f"{n}.0"),
            (a, f"\\boxed{{{a}}}"),
            (a, f"{n + 1}"),
            (a, f"\\frac{{{n * 2}}}{{2}}"),
        ]
    return pairs


def grade_chunk(pairs: list[tuple[str, str]]) -> int:
    return sum(grade(g, p).equivalent for g, p in pairs)


def rate(pairs: list[tuple[str, str]], workers: int) -> float:
    start = time.perf_counter()
    if workers == 1:
        grade_chunk(pairs)
    else:
        chunks = [pairs[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(grade_chunk, chunks))
    return len(pairs) / (time.perf_counter() - start)


def main() -> None:
    by_source: dict[str, list[tuple[bool, bool]]] = {}
    start = time.perf_counter()
    for row in ROWS:
        agrees = grade(row["gold"], row["pred"], **options(row)).equivalent == row["expected"]
        by_source.setdefault(row["repo"], []).append((agrees, row["id"] in DISAGREE))
    labelled_rate = len(ROWS) / (time.perf_counter() - start)
    print("agreement per source: all rows, and the rows kept (deliberate disagreements out):")
    for source, results in sorted(by_source.items()):
        kept = [agrees for agrees, excluded in results if not excluded]
        every = sum(agrees for agrees, _ in results)
        print(
            f"  {source:<38} all {every}/{len(results)} = {every / len(results):6.1%}   "
            f"kept {sum(kept)}/{len(kept)} = {sum(kept) / len(kept):6.1%}"
        )
    print(f"labelled pairs, 1 process:        {labelled_rate:8.0f} comparisons/s")
    pairs = short_pairs()
    grade_chunk(pairs[:50])
    print(f"short answers, 1 process:         {rate(pairs, 1):8.0f} comparisons/s")
    print(
        f"short answers, {CORES} processes:       {rate(pairs, CORES):8.0f} comparisons/s "
        "(target >= 1,000 on 2 cores)"
    )


if __name__ == "__main__":
    main()
