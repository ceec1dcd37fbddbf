"""Quality filters and train/validation/test splits: rows/s on synthetic rows.

Rows come in near-duplicate clusters of 1-10 rows (most of size 1-3), over 8 domains x 6
buckets (one of them "unsolved"), with log-normal token counts, 1% leaking and 0.5%
missing a domain; a few clusters mix strata. Times ``apply_filters`` (default filters
plus ``require_labels=["domain"]``) and ``assign_splits`` (0.8/0.1/0.1 by bucket and
domain), then checks that no cluster straddles splits and prints the worst per-stratum
and the overall deviation from the targets.

    .venv/bin/python bench/split.py [--rows 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathmill.labels.split import (
    FilterConfig,
    SplitConfig,
    apply_filters,
    assign_splits,
    reason_counts,
    split_report,
)

DOMAINS = ["algebra", "geometry", "number_theory", "counting", "precalculus", "calculus"]
DOMAINS += ["prealgebra", "statistics"]
BUCKETS = ["trivial", "easy", "medium", "hard", "unsolved", "very_hard"]


def synthetic(rows: int, seed: int) -> pl.DataFrame:
    """``rows`` rows in clusters of 1-10 rows; rows of a cluster share its labels except
    for 2% of rows, which take another bucket.
    """
    rng = np.random.default_rng(seed)
    weights = np.array([0.45, 0.2, 0.1, 0.07, 0.05, 0.04, 0.03, 0.03, 0.02, 0.01])
    sizes = rng.choice(np.arange(1, 11), size=rows, p=weights)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), rows) + 1]
    sizes[-1] -= int(sizes.sum()) - rows
    n_clusters = len(sizes)
    cluster = np.repeat(np.arange(n_clusters), sizes)
    domain = np.array(DOMAINS)[rng.integers(0, len(DOMAINS), n_clusters)][cluster]
    bucket = np.array(BUCKETS)[rng.integers(0, len(BUCKETS), n_clusters)][cluster]
    mixed = rng.random(rows) < 0.02
    bucket[mixed] = np.array(BUCKETS)[rng.integers(0, len(BUCKETS), int(mixed.sum()))]
    tokens = rng.lognormal(6.0, 0.6, rows).astype(np.int64)
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(rows)],
            "cluster_id": [f"c{c}" for c in cluster],
            "bucket": bucket,
            "domain": domain,
            "tokens": tokens,
            "leaking": rng.random(rows) < 0.01,
        }
    ).with_columns(
        pl.when(pl.Series(rng.random(rows) < 0.005))
        .then(None)
        .otherwise(pl.col("domain"))
        .alias("domain"),
        pl.when(pl.Series(rng.random(rows) < 0.01))
        .then(None)
        .otherwise(pl.col("tokens"))
        .alias("tokens"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    df = synthetic(args.rows, args.seed)
    n_clusters = df["cluster_id"].n_unique()
    print(f"{df.height:,} rows in {n_clusters:,} clusters")

    t0 = time.perf_counter()
    kept, removed = apply_filters(df, FilterConfig(require_labels=["domain"]))
    t1 = time.perf_counter()
    cfg = SplitConfig(seed=args.seed)
    split = assign_splits(kept, cfg)
    t2 = time.perf_counter()
    report = split_report(split, cfg)
    t3 = time.perf_counter()

    rate = df.height / (t1 - t0)
    print(f"filters: {t1 - t0:.2f} s, {rate:,.0f} rows/s; removed {reason_counts(removed)}")
    print(f"splits:  {t2 - t1:.2f} s, {kept.height / (t2 - t1):,.0f} rows/s")
    print(f"total:   {t2 - t0:.2f} s, {df.height / (t2 - t0):,.0f} rows/s (report {t3 - t2:.2f} s)")
    overall = report[-1]
    worst = max(
        abs(e["achieved"][s] - e["target"][s])
        for e in report[:-1]
        if e["rows"] >= 50
        for s in e["target"]
    )
    print(
        f"straddling clusters: {overall['straddling']}; "
        f"overall achieved {', '.join(f'{s} {v:.4f}' for s, v in overall['achieved'].items())}; "
        f"worst stratum deviation {worst * 100:.2f} points over {len(report) - 1} strata"
    )


if __name__ == "__main__":
    main()
