"""Rasch (1PL) difficulty fit over a simulated difficulty ladder with early exit.

For 10k and 100k problems x 5 rungs: wall seconds of ``fit_rasch`` (both censoring
modes, tabulation included), Newton iterations, and the Spearman rank correlation with
the planted difficulties of the Rasch fit (``censored="solved"`` and ``"ignore"``) and
of the naive ``weighted_score`` baseline; also the RMSE of ``b`` against the planted
values (abilities centered) and the share of problems whose planted value lies within
1.96 standard errors. ``--irregular`` adds, per size, a ladder whose problems got 2, 4,
8 or 16 samples per rung and lost 20% of the rungs before their last one at random
(missing at random): evidence of uneven weight, which the baseline cannot weigh.

    .venv/bin/python bench/rasch.py [--samples 4] [--seed 0] [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathmill.labels.rasch import (
    LadderObs,
    fit_rasch,
    run_ladder,
    simulate_ladder,
    weighted_score,
)

ABILITIES = {"0.5B": -3.0, "1.5B": -1.5, "7B": 0.0, "32B": 1.5, "72B": 3.0}


def _rho(truth: dict[str, float], est: dict[str, float]) -> float:
    ids = list(truth)
    return float(spearmanr([truth[i] for i in ids], [est[i] for i in ids]).statistic)


def _irregular(truth: dict[str, float], seed: int) -> list[LadderObs]:
    """The ladder run with 2, 4, 8 or 16 samples per rung (a random choice per problem),
    then 20% of the rungs that ran before the exiting (or last) rung dropped at random."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([2, 4, 8, 16], size=len(truth))
    ids = list(truth)
    by_id: dict[str, LadderObs] = {}
    for k, s in enumerate((2, 4, 8, 16)):
        group = {p: truth[p] for p, size in zip(ids, sizes, strict=True) if size == s}
        for o in run_ladder(group, ABILITIES, samples=s, seed=seed + 10 + k):
            by_id[o.problem_id] = o
    out = []
    for p in ids:
        names = list(by_id[p].counts)
        keep = {
            r: c
            for j, (r, c) in enumerate(by_id[p].counts.items())
            if j == len(names) - 1 or rng.random() >= 0.2
        }
        out.append(LadderObs(p, keep))
    return out


def run(n: int, samples: int, seed: int, irregular: bool) -> None:
    rungs = list(ABILITIES)
    obs, truth = simulate_ladder(n, ABILITIES, samples=samples, seed=seed)
    label = f"{n:,} x {len(rungs)} rungs x {samples} samples"
    if irregular:
        obs = _irregular(truth, seed)
        label = f"{n:,} x {len(rungs)} rungs, irregular (2-16 samples, 20% of rungs lost)"
    shift = float(np.mean(list(ABILITIES.values())))
    exits = sum(rungs[-1] not in o.counts for o in obs) / n
    print(f"\n{label}; {exits:.0%} exited early")
    print(f"{'method':<22} {'fit s':>7} {'iters':>5} {'spearman':>9} {'rmse b':>7} {'cover95':>8}")
    for censored in ("solved", "ignore"):
        t0 = time.perf_counter()
        fit = fit_rasch(obs, rungs, censored=censored)
        dt = time.perf_counter() - t0
        err = np.array([fit.difficulty[p] - (truth[p] - shift) for p in truth])
        se = np.array([fit.stderr[p] for p in truth])
        print(
            f"{'rasch ' + censored:<22} {dt:>7.2f} {fit.iterations:>5} "
            f"{_rho(truth, fit.difficulty):>9.4f} {np.sqrt(np.mean(err**2)):>7.3f} "
            f"{np.mean(np.abs(err) < 1.96 * se):>8.3f}"
        )
        if not fit.converged:
            print("  (did not converge)")
    t0 = time.perf_counter()
    w = weighted_score(obs, rungs)
    dt = time.perf_counter() - t0
    print(f"{'weighted baseline':<22} {dt:>7.2f} {'':>5} {_rho(truth, w):>9.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--irregular", action="store_true", help="also the irregular ladder")
    args = parser.parse_args()
    print(f"abilities {ABILITIES}; planted b ~ Normal(0, 1.5); exit at pass rate >= 0.5")
    for n in (int(s) for s in args.sizes.split(",")):
        run(n, args.samples, args.seed, irregular=False)
        if args.irregular:
            run(n, args.samples, args.seed, irregular=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
