"""The Rasch (1PL) difficulty fit over a difficulty ladder with early exit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom, spearmanr  # type: ignore[import-untyped]

from mathmill.labels.rasch import (
    LadderObs,
    RaschFit,
    _Censored,
    fit_rasch,
    run_ladder,
    simulate_ladder,
    weighted_score,
)

DATA = Path(__file__).parent / "data"
ABILITIES = {"r0": -1.5, "r1": 0.0, "r2": 1.5, "r3": 3.0}
RUNGS = list(ABILITIES)
# 8 samples per rung: with 4 samples the Bayes-optimal estimate (true abilities, true
# prior, posterior mean) reaches only Spearman ~0.86 on this ladder, so 0.9 needs 8.
SAMPLES = 8


def _rho(truth: dict[str, float], est: dict[str, float]) -> float:
    ids = list(truth)
    return float(spearmanr([truth[i] for i in ids], [est[i] for i in ids]).statistic)


@pytest.fixture(scope="module")
def ladder() -> tuple[list[LadderObs], dict[str, float]]:
    return simulate_ladder(2000, ABILITIES, samples=SAMPLES, seed=0)


@pytest.fixture(scope="module")
def fits(ladder: tuple[list[LadderObs], dict[str, float]]) -> dict[str, RaschFit]:
    obs, _ = ladder
    return {c: fit_rasch(obs, RUNGS, censored=c) for c in ("solved", "ignore")}


def test_recovers_planted_difficulties_and_ability_order(
    ladder: tuple[list[LadderObs], dict[str, float]], fits: dict[str, RaschFit]
) -> None:
    obs, truth = ladder
    assert any(len(o.counts) < len(RUNGS) for o in obs)  # early exits happened
    fit = fits["solved"]
    assert fit.converged and fit.iterations < 50
    assert _rho(truth, fit.difficulty) >= 0.9
    theta = [fit.abilities[r] for r in RUNGS]
    assert theta == sorted(theta)
    assert math.isclose(sum(theta), 0.0, abs_tol=1e-9)  # location: abilities centered
    # The planted gaps come back (the centered truth is -2.25, -0.75, 0.75, 2.25).
    centered = np.array(list(ABILITIES.values())) - np.mean(list(ABILITIES.values()))
    assert np.abs(np.array(theta) - centered).max() < 0.3


def test_censoring_modes_and_baseline(
    ladder: tuple[list[LadderObs], dict[str, float]], fits: dict[str, RaschFit]
) -> None:
    obs, truth = ladder
    rho = {c: _rho(truth, f.difficulty) for c, f in fits.items()}
    rho["weighted"] = _rho(truth, weighted_score(obs, RUNGS))
    print("spearman vs planted:", {k: round(v, 4) for k, v in rho.items()})  # noqa: T201 (shown with -s)
    assert rho["solved"] >= 0.9 and rho["ignore"] >= 0.9
    assert rho["solved"] >= rho["weighted"] - 0.01
    # Early exit is ignorable under the model (missing at random), so the censored
    # terms are not expected to improve the ranking; they must not hurt it either.
    assert rho["solved"] >= rho["ignore"] - 0.01
    # What the censored terms do: an early-exit problem is pushed down (easier).
    early = [o.problem_id for o in obs if len(o.counts) < len(RUNGS)]
    shift = [fits["solved"].difficulty[p] - fits["ignore"].difficulty[p] for p in early]
    assert np.mean(shift) < 0
    assert fits["solved"].method.startswith("rasch-1pl-map, censored=solved")
    assert fits["ignore"].method.startswith("rasch-1pl-map, censored=ignore")


def test_stderr_is_calibrated(
    ladder: tuple[list[LadderObs], dict[str, float]], fits: dict[str, RaschFit]
) -> None:
    _, truth = ladder
    shift = float(np.mean(list(ABILITIES.values())))  # the fit centers the abilities
    for fit in fits.values():
        z = np.array([(fit.difficulty[p] - (truth[p] - shift)) / fit.stderr[p] for p in truth])
        assert 0.92 <= float(np.mean(np.abs(z) < 1.96)) <= 0.98
        assert all(0 < s < 0.3 for s in fit.ability_stderr.values())


@pytest.mark.parametrize("censored", ["solved", "ignore"])
def test_extremes_are_finite_ordered_and_uncertain(
    ladder: tuple[list[LadderObs], dict[str, float]], censored: str
) -> None:
    obs, _ = ladder
    extra = [
        LadderObs("all-solved-at-r0", {"r0": (SAMPLES, SAMPLES)}),
        LadderObs("never-solved", {r: (0, SAMPLES) for r in RUNGS}),
    ]
    fit = fit_rasch(obs + extra, RUNGS, censored=censored)  # type: ignore[arg-type]
    easy, hard = fit.difficulty["all-solved-at-r0"], fit.difficulty["never-solved"]
    others = [v for p, v in fit.difficulty.items() if p not in ("all-solved-at-r0", "never-solved")]
    assert math.isfinite(easy) and math.isfinite(hard)
    assert easy <= min(others) and hard > max(others)
    # Well observed: ran at least three rungs with some wrong and some right answers.
    well = [
        fit.stderr[o.problem_id]
        for o in obs
        if len(o.counts) >= 3 and 0 < sum(c for c, _ in o.counts.values()) < SAMPLES * 3
    ]
    assert len(well) > 100
    median = float(np.median(well))
    assert fit.stderr["all-solved-at-r0"] > median
    assert fit.stderr["never-solved"] > median
    assert fit.normalized["all-solved-at-r0"] < fit.normalized["never-solved"]


def test_normalized_in_unit_interval_and_monotone(fits: dict[str, RaschFit]) -> None:
    for fit in fits.values():
        ids = sorted(fit.difficulty, key=fit.difficulty.__getitem__)
        norm = [fit.normalized[p] for p in ids]
        assert all(0.0 < v < 1.0 for v in norm)
        assert norm == sorted(norm)
        p = ids[len(ids) // 2]
        assert math.isclose(fit.normalized[p], 1 / (1 + math.exp(-fit.difficulty[p])))


def test_deterministic(ladder: tuple[list[LadderObs], dict[str, float]]) -> None:
    assert simulate_ladder(2000, ABILITIES, samples=SAMPLES, seed=0) == ladder
    obs, _ = ladder
    assert fit_rasch(obs, RUNGS) == fit_rasch(obs, RUNGS)
    assert weighted_score(obs, RUNGS) == weighted_score(obs, RUNGS)


def test_math500_levels_are_ordered() -> None:
    """Planted difficulty from MATH's level (1-5) on the real MATH-500 rows."""
    rows = [json.loads(line) for line in (DATA / "math500_labels.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    rng = np.random.default_rng(7)
    planted = {r["id"]: 1.0 * (int(r["level"]) - 3) + float(rng.normal(0, 0.5)) for r in rows}
    ladder = {"0.5B": -2.0, "1.5B": -0.5, "7B": 1.0, "32B": 2.5}
    obs = run_ladder(planted, ladder, samples=4, threshold=0.5, seed=3)
    fit = fit_rasch(obs, list(ladder))
    by_level: dict[int, list[float]] = {}
    for r in rows:
        by_level.setdefault(int(r["level"]), []).append(fit.normalized[r["id"]])
    means = [float(np.mean(by_level[lv])) for lv in range(1, 6)]
    print("mean normalized difficulty by level:", [round(m, 3) for m in means])  # noqa: T201 (shown with -s)
    assert means == sorted(means) and len(set(means)) == 5
    levels = [int(r["level"]) for r in rows]
    assert spearmanr(levels, [fit.difficulty[r["id"]] for r in rows]).statistic > 0.6


def test_censored_term_matches_binomial_tail() -> None:
    n, m = 8, 4
    eta = np.linspace(-6, 6, 25)[None, :]
    cens = _Censored(np.full(eta.shape, n, dtype=np.int64), np.full(eta.shape, m, dtype=np.int64))
    total, g, h = cens.terms(eta, True)
    p = 1 / (1 + np.exp(-eta))
    assert math.isclose(total, float(np.log(binom.sf(m - 1, n, p)).sum()), rel_tol=1e-10)
    eps = 1e-5
    up, _, _ = cens.terms(eta + eps, False)
    total_g = float(g.sum())
    assert math.isclose((up - total) / eps, total_g, rel_tol=1e-3)
    for j in range(eta.shape[1]):  # per-cell derivatives by central differences
        e = np.zeros_like(eta)
        e[0, j] = eps
        gp = cens.terms(eta + e, True)[1][0, j]
        gm = cens.terms(eta - e, True)[1][0, j]
        assert math.isclose((gp - gm) / (2 * eps), h[0, j], rel_tol=1e-4, abs_tol=1e-7)
        assert h[0, j] <= 0  # concave


def test_missing_rungs_that_are_no_early_exit_are_not_censored() -> None:
    # The last rung that ran failed: the missing r3 is not an early exit.
    failed = [LadderObs("p", {"r0": (0, 4), "r1": (0, 4), "r2": (1, 4)})]
    a = fit_rasch(failed, RUNGS, censored="solved")
    b = fit_rasch(failed, RUNGS, censored="ignore")
    assert a.difficulty == b.difficulty
    passed = [LadderObs("p", {"r0": (0, 4), "r1": (3, 4)})]
    assert (
        fit_rasch(passed, RUNGS).difficulty
        != fit_rasch(passed, RUNGS, censored="ignore").difficulty
    )


def test_small_and_bad_inputs() -> None:
    one = fit_rasch([LadderObs("a", {"only": (3, 4)}), LadderObs("b", {"only": (0, 4)})], ["only"])
    assert one.abilities == {"only": 0.0} and one.difficulty["a"] < one.difficulty["b"]
    empty = fit_rasch([], RUNGS)
    assert empty.difficulty == {} and empty.converged
    with pytest.raises(ValueError, match="unknown rung"):
        fit_rasch([LadderObs("a", {"x": (1, 2)})], RUNGS)
    with pytest.raises(ValueError, match="bad counts"):
        fit_rasch([LadderObs("a", {"r0": (3, 2)})], RUNGS)
    with pytest.raises(ValueError, match="duplicate problem_id"):
        fit_rasch([LadderObs("a", {"r0": (1, 2)})] * 2, RUNGS)
    with pytest.raises(ValueError, match="censored"):
        fit_rasch([], RUNGS, censored="drop")  # type: ignore[arg-type]


def test_weighted_score_baseline() -> None:
    obs = [
        LadderObs("easy", {"r0": (4, 4)}),
        LadderObs("mid", {"r0": (0, 4), "r1": (1, 4), "r2": (2, 4)}),
        LadderObs("hard", {r: (0, 4) for r in RUNGS}),
    ]
    w = weighted_score(obs, RUNGS)
    assert w["easy"] == 0.0 and w["hard"] == 1.0 and 0 < w["mid"] < 1
    heavy = weighted_score(obs, RUNGS, {"r0": 1, "r1": 1, "r2": 1, "r3": 5})
    assert heavy["mid"] < w["mid"]  # r3 was skipped (solved), now weighs more


@pytest.mark.parametrize("censored", ["solved", "ignore"])
def test_log_likelihood_is_the_models(censored: str) -> None:
    """``log_likelihood`` equals the binomial log-pmf of every observed cell (plus, with
    censoring, log P(K >= m) of every skipped rung) at the fitted parameters."""
    ladder = {"a": -1.0, "b": 0.5, "c": 2.0}
    obs, _ = simulate_ladder(300, ladder, seed=2)
    fit = fit_rasch(obs, list(ladder), censored=censored)  # type: ignore[arg-type]
    names = list(ladder)
    total = 0.0
    for o in obs:
        b = fit.difficulty[o.problem_id]
        p = {r: 1 / (1 + math.exp(-(fit.abilities[r] - b))) for r in names}
        total += sum(float(binom.logpmf(k, n, p[r])) for r, (k, n) in o.counts.items())
        last = max(names.index(r) for r in o.counts)
        k, n = o.counts[names[last]]
        if censored == "solved" and last < len(names) - 1 and k >= n / 2:
            total += sum(
                float(binom.logsf(math.ceil(n / 2) - 1, n, p[r])) for r in names[last + 1 :]
            )
    assert math.isclose(fit.log_likelihood, total, rel_tol=1e-9)
    assert fit.log_posterior < fit.log_likelihood - 1.0  # the prior costs something
