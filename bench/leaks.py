"""Leak detection: recall on hard-coded mutations of correct solutions and the false
positive rate on the correct solutions themselves (targets: recall >= 95%, FP <= 2%).

Correct solutions come from GSM8K's calculator annotations (tests/data/gsm8k_test.jsonl);
each is mutated six ways (mathmill.grading.mutations). The detector is static: no code runs.

    .venv/bin/python bench/leaks.py
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from mathmill.grading.leaks import detect_leak
from mathmill.grading.mutations import MUTATIONS, gsm8k_solution_code

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "gsm8k_test.jsonl"


def main() -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    clean = [
        (code, r["answer"])
        for r in rows
        if (code := gsm8k_solution_code(r["solution"], r["answer"])) is not None
    ]
    start = time.perf_counter()
    false_pos = [(c, a) for c, a in clean if detect_leak(c, a).leak]
    caught: Counter[str] = Counter()
    for code, answer in clean:
        for name, mutate in MUTATIONS.items():
            caught[name] += detect_leak(mutate(code, answer), answer).leak
    elapsed = time.perf_counter() - start
    n = len(clean)
    total = n * len(MUTATIONS)
    recall = sum(caught.values()) / total
    print(f"{len(rows)} GSM8K rows -> {n} correct solutions, {total} hard-coded mutations")
    for name in MUTATIONS:
        print(f"  {name:<11} recall {caught[name] / n:7.2%}")
    print(f"recall               {recall:7.2%}  (target >= 95%)")
    print(f"false positive rate  {len(false_pos) / n:7.2%}  (target <= 2%)")
    print(f"{(n + total) / elapsed:,.0f} programs/s")
    for code, answer in false_pos[:3]:
        print(f"--- false positive (answer {answer}):\n{code}\n{detect_leak(code, answer).reasons}")


if __name__ == "__main__":
    main()
