"""Diverse subset selection over BM25: the sparse-matrix version vs a rank-bm25 loop.

Synthetic Coq-like documents (a lemma statement and an ssreflect proof, 30-150 tokens,
Zipf-distributed lemma names, 5% near-duplicates; the generator of
``tests/test_formal_diverse.py``), seeded. Selects ``k`` of them with
``select_diverse`` (BM25 weights in a CSR matrix, one mat-vec per pick) and with
``select_diverse_reference`` (``rank_bm25.BM25Okapi.get_scores`` per pick) in the same
run, checks that both pick the same indices in the same order, and prints the wall
time of each (tokenizing and indexing included) and the ratio; then the fast version
alone for ``--k-large`` picks. With ``--ref-steps S < k`` the reference runs only ``S``
picks, its time is scaled per pick to ``k`` (said so in the output), and the first
``S`` picks are compared.

    .venv/bin/python bench/diverse.py [--docs 10000] [--k 300] [--k-large 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathmill.formal.diverse import (
    BM25Index,
    select_diverse,
    select_diverse_reference,
    tokenize,
)
from tests.test_formal_diverse import coq_corpus


def best_of(repeats: int, fn: Callable[..., list[int]], *args: object) -> tuple[float, list[int]]:
    """Best wall time of ``repeats`` calls of ``fn(*args)`` and its result."""
    times = []
    result: list[int] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--k-large", type=int, default=1000)
    parser.add_argument("--ref-steps", type=int, default=0, help="reference picks (0: k)")
    parser.add_argument("--repeats", type=int, default=5, help="best of, fast version")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    docs = coq_corpus(args.docs, seed=args.seed)
    t0 = time.perf_counter()
    tokenized = [tokenize(d) for d in docs]
    t1 = time.perf_counter()
    index = BM25Index(tokenized)
    t2 = time.perf_counter()
    lengths = [len(t) for t in tokenized]
    print(
        f"{len(docs):,} documents, {sum(lengths):,} tokens (per document: min {min(lengths)}, "
        f"median {statistics.median(lengths):.0f}, max {max(lengths)}), "
        f"{len(index.vocab):,} terms, {index.weights.nnz:,} non-zero weights; "
        f"tokenize {t1 - t0:.2f} s, index {t2 - t1:.2f} s"
    )

    fast_s, fast = best_of(args.repeats, select_diverse, docs, args.k, args.seed)
    ref_steps = args.ref_steps if 0 < args.ref_steps < args.k else args.k
    t0 = time.perf_counter()
    ref = select_diverse_reference(docs, ref_steps, args.seed)
    ref_run_s = time.perf_counter() - t0
    if ref_steps < args.k:
        # the fixed cost (tokenize, BM25Okapi) once, the rest scaled per pick
        t0 = time.perf_counter()
        select_diverse_reference(docs, 1, args.seed)
        fixed = time.perf_counter() - t0
        ref_s = fixed + (ref_run_s - fixed) * (args.k - 1) / max(ref_steps - 1, 1)
        note = f" (ran {ref_steps} picks in {ref_run_s:.2f} s, fixed {fixed:.2f} s; scaled)"
    else:
        ref_s, note = ref_run_s, ""
    same = fast[:ref_steps] == ref
    print(
        f"k={args.k}: fast {fast_s:.3f} s (best of {args.repeats}), "
        f"rank-bm25 loop {ref_s:.2f} s{note}"
    )
    print(f"  same selection: {same} ({ref_steps} picks compared)")
    print(f"  speed ratio rank-bm25 / fast: {ref_s / fast_s:.0f}x (target >= 50x)")

    large_s, large = best_of(args.repeats, select_diverse, docs, args.k_large, args.seed)
    print(
        f"k={args.k_large}: fast {large_s:.3f} s (best of {args.repeats}); "
        f"a prefix of k={args.k}: {large[: args.k] == fast}"
    )
    if not same:
        sys.exit("selections differ")


if __name__ == "__main__":
    main()
