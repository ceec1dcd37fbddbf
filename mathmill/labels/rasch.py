"""Effective problem difficulty from a difficulty ladder, by a Rasch (1PL IRT) fit.

A *difficulty ladder* runs an ordered list of models (rungs, weakest first) on each
problem: ``samples`` graded attempts per rung. A rung whose pass rate reaches the exit
threshold *solves* the problem and the ladder stops there: the larger rungs are not run
(they are *censored*). :func:`fit_rasch` fits the binomial Rasch model

    P(correct | rung r, problem p) = sigmoid(theta_r - b_p)

jointly over every problem and rung, by penalized maximum likelihood (MAP): a
Normal(0, ``prior_sd``) prior on each ``b_p`` and each ``theta_r`` keeps problems that
every rung solved (or none did) finite. The location is fixed by **centering the
abilities**: ``sum(theta_r) = 0`` is a constraint of the fit (not a shift afterwards), so
``b_p = 0`` means "the ladder's average rung solves half its samples" however many
problems are fitted (adding problems refits the abilities, not the anchor).

Censoring (``censored="solved"``): a rung skipped after an early exit adds the term
``log P(K >= m)``, ``K ~ Binomial(n, sigmoid(theta_r - b_p))``, where ``n`` is the
exiting rung's sample count and ``m = ceil(threshold * n)``: the exact probability that
the skipped rung would have passed the exit threshold too, which is what "a larger model
would very likely solve it as well" says. Its log is concave in ``theta_r - b_p`` (it is
the log CDF of a log-concave density: the logit of a Beta(m, n - m + 1) variable), so the
objective stays concave and Newton's method converges from zero. ``censored="ignore"``
drops those rungs. Note that under the Rasch model itself the early-exit rule is
*ignorable* (whether a rung runs depends only on outcomes already observed, i.e. missing
at random), so ``"ignore"`` is the model's exact likelihood and ``"solved"`` adds the
ladder's own assumption as evidence: it pushes early-exit problems further down the
scale. On simulated Rasch ladders (``bench/rasch.py``) the two modes rank problems
alike (Spearman within 0.005) and ``"ignore"`` has the slightly lower RMSE and the
better-calibrated standard errors; ``"solved"`` is the default for real ladders, which
are not exactly Rasch, where it encodes the rungs' ordering. Rungs missing for any other
reason (before the last rung that ran, or after a last rung that did not pass) are
treated as not observed in both modes.

The optimizer is a joint Newton method with step halving on the concave log posterior;
each step solves the block-arrow Hessian (diagonal in the difficulties, dense
``R - 1`` x ``R - 1`` in the abilities) by its Schur complement, in ``O(P R^2)``.
The standard error of ``b_p`` is the square root of the ``b_p`` diagonal entry of the
inverse observed information (negative Hessian of the log posterior, prior included) of
the whole fit, abilities' uncertainty included.

>>> obs, true_b = simulate_ladder(300, {"s": -2.0, "m": 0.0, "l": 2.0}, seed=1)
>>> fit = fit_rasch(obs, ["s", "m", "l"])
>>> fit.converged, fit.abilities["s"] < fit.abilities["m"] < fit.abilities["l"]
(True, True)
>>> round(sum(fit.abilities.values()), 9)
0.0
>>> all(0.0 < v < 1.0 for v in fit.normalized.values())
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "LadderObs",
    "RaschFit",
    "fit_rasch",
    "run_ladder",
    "simulate_ladder",
    "weighted_score",
]

Censored = Literal["solved", "ignore"]
_F = npt.NDArray[np.float64]
_I = npt.NDArray[np.int64]


@dataclass(frozen=True)
class LadderObs:
    """What a difficulty ladder observed on one problem.

    ``counts`` maps a rung name to ``(correct, samples)``; a rung that is absent was
    not run on this problem (censored after an early exit, or not run at all).
    """

    problem_id: str
    counts: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class RaschFit:
    """The result of :func:`fit_rasch`.

    ``difficulty`` holds ``b_p`` on the logit scale with the abilities centered
    (``sum(abilities) == 0``); ``stderr`` its standard error (``ability_stderr`` the
    abilities'); ``normalized`` is
    ``sigmoid(b_p)``: the per-sample failure probability of a rung of the ladder's mean
    ability, in (0, 1), monotone in ``b_p`` and unchanged in meaning as problems are
    added. ``log_likelihood`` is the data log-likelihood at the optimum (binomial
    coefficients included; the censored terms too when ``censored="solved"``) and
    ``log_posterior`` the objective maximized (that plus the log prior, without the
    prior's normalizing constant).
    """

    abilities: dict[str, float]
    ability_stderr: dict[str, float]
    difficulty: dict[str, float]
    stderr: dict[str, float]
    normalized: dict[str, float]
    method: str
    iterations: int
    log_likelihood: float
    log_posterior: float
    converged: bool


@dataclass(frozen=True)
class _Data:
    ids: list[str]
    k: _F  # P x R correct counts (0 where not run)
    n: _F  # P x R sample counts (0 where not run)
    cen_n: _I  # P x R: samples a censored rung would have drawn (0 = not censored)
    cen_m: _I  # P x R: passes it would have needed


def _pass_needed(samples: int, threshold: float) -> int:
    """The fewest correct answers out of ``samples`` whose rate reaches ``threshold``."""
    return max(0, math.ceil(threshold * samples - 1e-9))


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _exit_index(ob: LadderObs, rungs: Sequence[str], threshold: float) -> int | None:
    """The rung index where the ladder exited early (the last rung that ran, when it
    passed the threshold and later rungs did not run), else None."""
    ran = [i for i, r in enumerate(rungs) if ob.counts.get(r, (0, 0))[1] > 0]
    if not ran or ran[-1] == len(rungs) - 1:
        return None
    last = ran[-1]
    correct, samples = ob.counts[rungs[last]]
    if samples > 0 and correct >= _pass_needed(samples, threshold):
        return last
    return None


def _tabulate(
    obs: Sequence[LadderObs], rungs: Sequence[str], threshold: float, censored: Censored
) -> _Data:
    index = {r: j for j, r in enumerate(rungs)}
    if len(index) != len(rungs):
        raise ValueError(f"duplicate rung names in {list(rungs)}")
    p, nr = len(obs), len(rungs)
    ids = [ob.problem_id for ob in obs]
    if len(set(ids)) != p:
        seen: set[str] = set()
        for pid in ids:
            if pid in seen:
                raise ValueError(f"duplicate problem_id {pid!r}")
            seen.add(pid)
    rows: list[int] = []
    cols: list[int] = []
    cells: list[tuple[int, int]] = []
    for i, ob in enumerate(obs):
        for rung, pair in ob.counts.items():
            j = index.get(rung)
            if j is None:
                raise ValueError(f"problem {ob.problem_id!r}: unknown rung {rung!r}")
            rows.append(i)
            cols.append(j)
            cells.append(pair)
    row = np.array(rows, dtype=np.int64)
    col = np.array(cols, dtype=np.int64)
    counts = np.array(cells, dtype=np.int64).reshape(-1, 2)
    bad = (counts[:, 0] < 0) | (counts[:, 0] > counts[:, 1])
    if bad.any():
        at = int(np.argmax(bad))
        pair = (int(counts[at, 0]), int(counts[at, 1]))
        raise ValueError(f"problem {ids[row[at]]!r}, rung {rungs[col[at]]!r}: bad counts {pair}")
    k = np.zeros((p, nr))
    n = np.zeros((p, nr))
    k[row, col] = counts[:, 0]
    n[row, col] = counts[:, 1]
    cen_n = np.zeros((p, nr), dtype=np.int64)
    cen_m = np.zeros((p, nr), dtype=np.int64)
    if censored == "solved" and p and nr > 1:
        # An early exit: the last rung that ran passed the threshold and was not the top.
        ran = n > 0
        last = np.where(ran.any(axis=1), nr - 1 - np.argmax(ran[:, ::-1], axis=1), -1)
        top = np.arange(p)
        samples = n[top, last].astype(np.int64)
        need = np.maximum(0, np.ceil(threshold * samples - 1e-9)).astype(np.int64)
        exited = (last >= 0) & (last < nr - 1) & (k[top, last] >= need) & (need > 0)
        later = (np.arange(nr)[None, :] > last[:, None]) & exited[:, None]
        cen_n = np.where(later, samples[:, None], 0)
        cen_m = np.where(later, need[:, None], 0)
    return _Data(ids, k, n, cen_n, cen_m)


def _log_sigmoid(x: _F) -> _F:
    return -np.logaddexp(0.0, -x)


def _helmert(r: int) -> _F:
    """An orthonormal ``r x (r - 1)`` basis of the vectors that sum to zero."""
    q = np.zeros((r, max(r - 1, 0)))
    for j in range(1, r):
        q[:j, j - 1] = 1.0
        q[j, j - 1] = -float(j)
        q[:, j - 1] /= math.sqrt(j * (j + 1))
    return q


class _Censored:
    """The ``log P(K >= m)`` terms of the censored cells, grouped by ``(n, m)``."""

    def __init__(self, cen_n: _I, cen_m: _I) -> None:
        self.groups: list[tuple[tuple[_I, _I], int, int, _F, float]] = []
        mask = cen_n > 0
        if not mask.any():
            return
        base = int(cen_m.max()) + 1
        for code in np.unique(cen_n[mask] * base + cen_m[mask]).tolist():
            nn, mm = divmod(int(code), base)
            where = np.nonzero((cen_n == nn) & (cen_m == mm))
            ks = np.arange(mm, nn + 1)
            lbinom = np.array([_lbinom(nn, int(j)) for j in ks])
            log_beta = math.lgamma(mm) + math.lgamma(nn - mm + 1) - math.lgamma(nn + 1)
            self.groups.append(((where[0], where[1]), int(nn), int(mm), lbinom, log_beta))

    def terms(self, eta: _F, want_derivs: bool = True) -> tuple[float, _F, _F]:
        """Sum of log P(K >= m) over censored cells; per-cell 1st and 2nd derivatives
        in ``eta`` (dense, zero elsewhere) when ``want_derivs``."""
        total = 0.0
        g = np.zeros_like(eta)
        h = np.zeros_like(eta)
        for where, nn, mm, lbinom, log_beta in self.groups:
            x = eta[where]
            lp = _log_sigmoid(x)
            lq = lp - x
            ks = np.arange(mm, nn + 1)
            terms = lbinom[None, :] + ks[None, :] * lp[:, None] + (nn - ks)[None, :] * lq[:, None]
            top = terms.max(axis=1)
            log_s = top + np.log(np.exp(terms - top[:, None]).sum(axis=1))
            total += float(log_s.sum())
            if want_derivs:
                # d log S / d eta = f / S with f the logit-Beta(m, n - m + 1) density.
                log_f = mm * lp + (nn - mm + 1) * lq - log_beta
                g1 = np.exp(log_f - log_s)
                g[where] = g1
                h[where] = np.minimum(g1 * (mm - (nn + 1) * np.exp(lp)) - g1 * g1, 0.0)
        return total, g, h


def _lbinom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fit_rasch(
    obs: Sequence[LadderObs],
    rungs: Sequence[str],
    *,
    censored: Censored = "solved",
    threshold: float = 0.5,
    prior_sd: float = 2.0,
    max_iter: int = 200,
    tol: float = 1e-8,
) -> RaschFit:
    """Fit the binomial Rasch model to ladder observations (MAP, see the module doc).

    ``rungs`` lists the rung names weakest first (the ladder's order: it decides which
    rungs an early exit censored). ``threshold`` is the ladder's exit pass rate, used to
    recognize an early exit and, with ``censored="solved"``, for the censored terms.
    Newton iterations stop when the largest step is below ``tol`` (``converged``) or
    after ``max_iter``.
    """
    if censored not in ("solved", "ignore"):
        raise ValueError(f"censored must be 'solved' or 'ignore', got {censored!r}")
    if prior_sd <= 0:
        raise ValueError(f"prior_sd must be positive, got {prior_sd}")
    if not rungs:
        raise ValueError("no rungs")
    _check_threshold(threshold)
    data = _tabulate(obs, rungs, threshold, censored)
    nr = len(rungs)
    q = _helmert(nr)
    prec = 1.0 / (prior_sd * prior_sd)
    cens = _Censored(data.cen_n, data.cen_m)
    k, n = data.k, data.n
    const = _log_binom_total(n, k)

    def loglik(b: _F, eta: _F) -> tuple[float, _F, _F]:
        """Data log-likelihood (up to the binomial constant), per-cell d/dx and d2/dx2
        in ``x = theta_r - b_p``."""
        x = (q @ eta)[None, :] - b[:, None]
        lp = _log_sigmoid(x)
        lq = lp - x  # log sigmoid(-x)
        ll = float((k * lp + (n - k) * lq).sum())
        cl, cg, ch = cens.terms(x, True)
        pr = np.exp(lp)
        g = k - n * pr + cg
        h = -n * pr * (1.0 - pr) + ch
        return ll + cl, g, h

    def posterior(b: _F, eta: _F, ll: float) -> float:
        return ll - 0.5 * prec * (float(b @ b) + float(eta @ eta))

    b = np.zeros(len(obs))
    eta = np.zeros(nr - 1)
    ll, g, h = loglik(b, eta)
    lpost = posterior(b, eta, ll)
    converged = False
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        hc = -h  # per-cell information, >= 0
        grad_b = -g.sum(axis=1) - prec * b
        grad_eta = q.T @ g.sum(axis=0) - prec * eta
        d_b = hc.sum(axis=1) + prec
        step_b, step_eta, _ = _newton_solve(q, hc, d_b, prec, grad_b, grad_eta)
        t = 1.0
        while True:  # step halving: the log posterior must not go down
            nb, neta = b + t * step_b, eta + t * step_eta
            nll, ng, nh = loglik(nb, neta)
            npost = posterior(nb, neta, nll)
            if npost >= lpost - 1e-12 * max(1.0, abs(lpost)) or t < 1e-10:
                break
            t *= 0.5
        b, eta, ll, g, h, lpost = nb, neta, nll, ng, nh, npost
        biggest = t * max(
            float(np.abs(step_b).max(initial=0.0)), float(np.abs(step_eta).max(initial=0.0))
        )
        if biggest < tol:
            converged = True
            break

    hc = -h
    d_b = hc.sum(axis=1) + prec
    zero_b, zero_eta = np.zeros_like(b), np.zeros_like(eta)
    _, _, (var_b, var_theta) = _newton_solve(q, hc, d_b, prec, zero_b, zero_eta, want_var=True)
    theta = q @ eta
    return RaschFit(
        abilities={r: float(v) for r, v in zip(rungs, theta, strict=True)},
        ability_stderr={r: float(math.sqrt(v)) for r, v in zip(rungs, var_theta, strict=True)},
        difficulty={pid: float(v) for pid, v in zip(data.ids, b, strict=True)},
        stderr={pid: float(math.sqrt(v)) for pid, v in zip(data.ids, var_b, strict=True)},
        normalized={
            pid: float(v) for pid, v in zip(data.ids, np.exp(_log_sigmoid(b)), strict=True)
        },
        method=f"rasch-1pl-map, censored={censored}, prior_sd={prior_sd:g}, abilities centered",
        iterations=iterations,
        log_likelihood=ll + const,
        log_posterior=lpost + const,
        converged=converged,
    )


def _log_binom_total(n: _F, k: _F) -> float:
    """Sum over cells of log C(n, k) (the binomial constant of the log-likelihood)."""
    if n.size == 0:
        return 0.0
    top = int(n.max())
    lfact = np.array([math.lgamma(i + 1) for i in range(top + 1)])
    ni, ki = n.astype(np.int64), k.astype(np.int64)
    return float((lfact[ni] - lfact[ki] - lfact[ni - ki]).sum())


def _newton_solve(
    q: _F,
    hc: _F,
    d_b: _F,
    prec: float,
    grad_b: _F,
    grad_eta: _F,
    want_var: bool = False,
) -> tuple[_F, _F, tuple[_F, _F]]:
    """Solve ``[[D_b, M], [M^T, A]] [db; deta] = [grad_b; grad_eta]`` (the negative
    Hessian of the log posterior) by the Schur complement of ``D_b``; with ``want_var``
    also the diagonals of its inverse for ``b`` and for ``theta = q @ eta``."""
    d_theta = hc.sum(axis=0) + prec
    m = -(hc @ q)  # d2/db_p d eta_j of the negative log posterior
    u = m / d_b[:, None]
    a = (q.T * d_theta) @ q
    schur = a - m.T @ u
    rhs = grad_eta - u.T @ grad_b
    step_eta = np.linalg.solve(schur, rhs) if len(rhs) else np.zeros(0)
    step_b = (grad_b - m @ step_eta) / d_b
    var_b = np.zeros(0)
    var_theta = np.zeros(0)
    if want_var:
        inv = np.linalg.inv(schur) if len(rhs) else np.zeros((0, 0))
        var_b = 1.0 / d_b + np.einsum("pi,ij,pj->p", u, inv, u)
        var_theta = np.einsum("ri,ij,rj->r", q, inv, q)
    return step_b, step_eta, (var_b, var_theta)


def weighted_score(
    obs: Sequence[LadderObs],
    rungs: Sequence[str],
    weights: Mapping[str, float] | None = None,
    *,
    threshold: float = 0.5,
) -> dict[str, float]:
    """The naive baseline: a weighted mean over rungs of the failure rate, in [0, 1].

    A rung that ran contributes ``1 - correct / samples``; a rung skipped after an early
    exit counts as solved (failure rate 0); a rung missing otherwise is left out (the
    weights renormalized). Equal weights (the default) make the score about "index of
    the first solving rung plus the partial failures, over the number of rungs".

    >>> ob = LadderObs("p", {"s": (0, 4), "m": (3, 4)})
    >>> weighted_score([ob], ["s", "m", "l"])
    {'p': 0.4166666666666667}
    """
    _check_threshold(threshold)
    w = {r: 1.0 for r in rungs} if weights is None else {r: float(weights[r]) for r in rungs}
    out: dict[str, float] = {}
    for ob in obs:
        last = _exit_index(ob, rungs, threshold)
        num = den = 0.0
        for i, r in enumerate(rungs):
            if r in ob.counts:
                correct, samples = ob.counts[r]
                if samples == 0:
                    continue
                num += w[r] * (1.0 - correct / samples)
                den += w[r]
            elif last is not None and i > last:
                den += w[r]
        out[ob.problem_id] = num / den if den > 0 else 0.5
    return out


def run_ladder(
    difficulties: Mapping[str, float],
    rungs_abilities: Mapping[str, float],
    *,
    samples: int = 4,
    threshold: float = 0.5,
    seed: int = 0,
) -> list[LadderObs]:
    """Run a simulated ladder (rungs in the mapping's order) on problems of the given
    Rasch difficulties, with early exit at pass rate ``threshold``."""
    _check_threshold(threshold)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    ids = list(difficulties)
    b = np.array([difficulties[i] for i in ids], dtype=np.float64)
    names = list(rungs_abilities)
    theta = np.array([rungs_abilities[r] for r in names], dtype=np.float64)
    prob = 1.0 / (1.0 + np.exp(-(theta[None, :] - b[:, None])))
    correct = rng.binomial(samples, prob)
    passed = correct >= _pass_needed(samples, threshold)
    # Rungs up to and including the first that passed (all of them if none did).
    first = np.where(passed.any(axis=1), passed.argmax(axis=1), len(names) - 1)
    out: list[LadderObs] = []
    for i, pid in enumerate(ids):
        row = correct[i].tolist()
        out.append(
            LadderObs(pid, {names[j]: (int(row[j]), samples) for j in range(int(first[i]) + 1)})
        )
    return out


def simulate_ladder(
    n_problems: int,
    rungs_abilities: dict[str, float],
    *,
    samples: int = 4,
    threshold: float = 0.5,
    seed: int = 0,
) -> tuple[list[LadderObs], dict[str, float]]:
    """Planted difficulties ~ Normal(0, 1.5), run through :func:`run_ladder`.

    Returns the observations and the true difficulties by problem id.

    >>> obs, true_b = simulate_ladder(3, {"s": -1.0, "l": 1.0}, seed=0)
    >>> [o.problem_id for o in obs] == list(true_b)
    True
    """
    rng = np.random.default_rng(seed)
    width = len(str(max(n_problems - 1, 0)))
    true_b = {
        f"sim-{i:0{width}d}": float(v) for i, v in enumerate(rng.normal(0.0, 1.5, n_problems))
    }
    obs = run_ladder(true_b, rungs_abilities, samples=samples, threshold=threshold, seed=seed + 1)
    return obs, true_b
