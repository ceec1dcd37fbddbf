"""The report's charts: one function per chart, each taking the run's figures
(:class:`~mathmill.report.data.RunData`) and returning PNG bytes, or None when the
run has no data for it (a chart is left out, never drawn empty).

matplotlib's object API with the Agg canvas (no pyplot: no global state, safe in a
worker thread). Bars are sorted, axes say their units, every chart has a title.
"""

from __future__ import annotations

import io
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mathmill.report.data import RunData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["CHARTS", "Chart", "render_charts"]

WIDTH = 10.0  # inches, at 100 dpi: 1000 px wide
DPI = 100
MAX_BARS = 25
_KEPT = "#4878a8"
_LOST = "#c8553d"
_OTHER = "#8c8c8c"
_PALETTE = ("#4878a8", "#c8553d", "#6a9f58", "#e1a53f", "#8e6bb0", "#5fa2a8", "#967662")
# Outcomes (the part of a count's key after the stage) that mean rows were lost.
_LOSS_WORDS = (
    "drop",
    "duplicate",
    "unverified",
    "unsolved",
    "failed",
    "error",
    "leak",
    "contaminat",
    "malformed",
    "contains_solution",
    "filtered",
    "off_domain",
    "incorrect",
    "wrong",
    "timeout",
    "no_answer",
    "surplus",
    "aime",
    "amc",
    "math500",
    "gsm8k",
)


@dataclass(frozen=True)
class Chart:
    """One chart of the report: file name (``report/<name>.png``), title, drawer."""

    name: str
    title: str
    draw: Callable[[RunData], bytes | None]


def _figure(height: float, cols: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, max(2.6, height)), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Figure, title: str) -> bytes:
    fig.suptitle(title, fontsize=14, fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _style(ax: Axes) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _barh(
    ax: Axes,
    labels: Sequence[str],
    values: Sequence[float],
    colors: Sequence[str] | str = _KEPT,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    texts: Sequence[str] | None = None,
    integer: bool = True,
) -> None:
    """Horizontal bars, first label at the top, each with its value (or ``texts``) at
    its end.
    """
    y = list(range(len(labels)))
    bars = ax.barh(y, values, color=colors, height=0.7 if len(labels) > 2 else 0.45)
    ax.set_yticks(y, [_short(label) for label in labels])
    if integer:
        _integer_ticks(ax.xaxis)
    ax.invert_yaxis()
    ax.bar_label(bars, labels=texts or [fmt(v) for v in values], padding=3, fontsize=9)
    ax.margins(x=0.12)
    _style(ax)


def _integer_ticks(axis: object) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))  # type: ignore[attr-defined]


def _short(text: str, n: int = 42) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _top(counter: Counter[str], n: int = MAX_BARS) -> list[tuple[str, int]]:
    """The ``n`` largest (most first, ties by name), the rest summed as ``other``."""
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(items) <= n:
        return items
    rest = sum(v for _, v in items[n - 1 :])
    return [*items[: n - 1], (f"other ({len(items) - n + 1})", rest)]


def is_loss(outcome: str) -> bool:
    """Whether a count's outcome means rows were lost (dropped, failed, unverified).

    >>> is_loss("unverified.timeout"), is_loss("verified_round_0"), is_loss("duplicate")
    (True, False, True)
    """
    return any(word in outcome for word in _LOSS_WORDS)


def rows_by_stage(data: RunData) -> bytes | None:
    """Every non-zero count, stages in run order, most rows first within a stage;
    outcomes where rows were lost in red.
    """
    by_stage: dict[str, list[tuple[str, int]]] = {}
    for key, n in data.counts.items():
        if n > 0:
            stage, _, outcome = key.partition(".")
            by_stage.setdefault(stage, []).append((outcome or "-", n))
    if not by_stage:
        return None
    order = [s for s in data.stages if s in by_stage] + sorted(
        s for s in by_stage if s not in data.stages
    )
    labels: list[str] = []
    values: list[int] = []
    colors: list[str] = []
    breaks: list[int] = []
    for stage in order:
        breaks.append(len(labels))
        for outcome, n in sorted(by_stage[stage], key=lambda kv: (-kv[1], kv[0])):
            labels.append(f"{stage} · {outcome}")
            values.append(n)
            colors.append(_LOST if is_loss(outcome) else _KEPT)
    fig, (ax,) = _figure(0.8 + 0.24 * len(labels))
    _barh(ax, labels, values, colors)
    for y in breaks[1:]:
        ax.axhline(y - 0.5, color="#bbbbbb", linewidth=0.8)
    ax.set_xlabel("rows (or events) counted")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color=_KEPT, label="kept / done"),
            Patch(color=_LOST, label="lost / failed"),
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=2,
        frameon=False,
    )
    return _png(fig, "Rows by stage and outcome")


def difficulty(data: RunData) -> bytes | None:
    """Rows per difficulty bucket (the ladder's first rung that solved it) and the
    histogram of effective difficulty in [0, 1].
    """
    panels = [p for p in (data.buckets, data.difficulty) if p]
    if not panels:
        return None
    fig, axes = _figure(3.6, len(panels))
    ax = iter(axes)
    if data.buckets:
        a = next(ax)
        items = _top(data.buckets)
        _barh(a, [k for k, _ in items], [v for _, v in items])
        a.set_xlabel("rows")
        a.set_title("by difficulty bucket (first rung that solved it)", fontsize=11)
    if data.difficulty:
        a = next(ax)
        a.hist(data.difficulty, bins=20, range=(0.0, 1.0), color=_KEPT, edgecolor="white")
        a.set_xlabel("effective difficulty (0 = easiest, 1 = hardest)")
        a.set_ylabel("rows")
        _integer_ticks(a.yaxis)
        a.set_title(f"effective difficulty (n = {len(data.difficulty)})", fontsize=11)
        _style(a)
        a.grid(axis="y", alpha=0.3)
    return _png(fig, "Difficulty distribution")


def balance(data: RunData) -> bytes | None:
    """Rows per domain and the most frequent structure tags."""
    panels = [p for p in (data.domains, data.structure) if p]
    if not panels:
        return None
    n = max(len(_top(p, 20)) for p in panels)
    fig, axes = _figure(1.0 + 0.3 * n, len(panels))
    ax = iter(axes)
    total = sum(data.domains.values())
    if data.domains:
        a = next(ax)
        items = _top(data.domains, 20)
        _barh(
            a,
            [k for k, _ in items],
            [v for _, v in items],
            fmt=lambda v: f"{v:g} ({100 * v / total:.0f}%)",
        )
        a.set_xlabel("rows")
        a.set_title("by domain", fontsize=11)
    if data.structure:
        a = next(ax)
        items = _top(data.structure, 20)
        _barh(a, [k for k, _ in items], [v for _, v in items], colors=_PALETTE[2])
        a.set_xlabel("rows with the tag")
        a.set_title("by structure tag (most frequent)", fontsize=11)
    return _png(fig, "Domain and structure balance")


def lengths(data: RunData) -> bytes | None:
    """Solution length in tokens by outcome: a box per outcome (median, quartiles,
    5th-95th percentile whiskers), longest median at the top.
    """
    groups = {k: v for k, v in data.lengths.items() if v}
    if not groups:
        return None
    order = sorted(groups, key=lambda k: (-statistics.median(groups[k]), k))
    fig, (ax,) = _figure(1.2 + 0.45 * len(order))
    boxes = ax.boxplot(
        [groups[k] for k in order],
        orientation="horizontal",
        whis=(5, 95),
        patch_artist=True,
        showfliers=False,
        tick_labels=[f"{k} (n = {len(groups[k])})" for k in order],
    )
    rng = random.Random(0)
    for i, (patch, name) in enumerate(zip(boxes["boxes"], order, strict=True)):
        color = _KEPT if name in {"verified", "correct", "solved"} else _LOST
        patch.set_facecolor(color)
        patch.set_alpha(0.35)
        values = groups[name]
        if len(values) > 400:
            values = rng.sample(values, 400)
        ys = [i + 1 + rng.uniform(-0.18, 0.18) for _ in values]
        ax.scatter(values, ys, s=10, color=color, alpha=0.7, linewidths=0, zorder=3)
    for median in boxes["medians"]:
        median.set(color="#222222", linewidth=2)
    ax.invert_yaxis()
    ax.set_xlabel("solution length (tokens)")
    _style(ax)
    return _png(fig, "Solution length by outcome")


def failures(data: RunData) -> bytes | None:
    """Why rows failed verification, most frequent first."""
    if not data.failures:
        return None
    items = _top(data.failures)
    fig, (ax,) = _figure(1.0 + 0.3 * len(items))
    _barh(ax, [k for k, _ in items], [v for _, v in items], colors=_LOST)
    ax.set_xlabel("rows")
    return _png(fig, "Verification failure reasons")


def rounds(data: RunData) -> bytes | None:
    """Rows by the rewrite/repair rounds they took, one bar per outcome and round."""
    groups = {k: v for k, v in data.rounds.items() if sum(v.values())}
    if not groups:
        return None
    xs = sorted({r for c in groups.values() for r in c})
    fig, (ax,) = _figure(3.6)
    width = 0.8 / len(groups)
    order = sorted(groups, key=lambda k: -sum(groups[k].values()))
    for i, name in enumerate(order):
        offset = (i - (len(groups) - 1) / 2) * width
        color = _LOST if name == "unverified" else _PALETTE[(i * 2) % len(_PALETTE)]
        bars = ax.bar(
            [x + offset for x in range(len(xs))],
            [groups[name][r] for r in xs],
            width,
            label=name,
            color=color,
        )
        ax.bar_label(bars, padding=2, fontsize=9)
    ax.set_xticks(range(len(xs)), [str(r) for r in xs])
    _integer_ticks(ax.yaxis)
    ax.set_xlabel("rewrite / repair rounds (0 = right at the first try)")
    ax.set_ylabel("rows")
    ax.legend(frameon=False)
    ax.margins(y=0.15)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png(fig, "Rewrite and repair rounds needed")


def pass_rates(data: RunData) -> bytes | None:
    """Each model's pass rate over its graded samples, best first."""
    rates = {m: (r, g) for m, (r, g) in data.pass_rates.items() if g}
    if not rates:
        return None
    order = sorted(rates, key=lambda m: (-rates[m][0] / rates[m][1], m))[:MAX_BARS]
    values = [100.0 * rates[m][0] / rates[m][1] for m in order]
    fig, (ax,) = _figure(1.0 + 0.4 * len(order))
    texts = [f"{v:.0f}% ({rates[m][0]}/{rates[m][1]})" for m, v in zip(order, values, strict=True)]
    _barh(ax, order, values, colors=_PALETTE[0], texts=texts, integer=False)
    ax.set_xlim(0, 118)
    ax.set_xlabel("pass rate (% of graded samples right)")
    return _png(fig, "Pass rate by model")


def usage(data: RunData) -> bytes | None:
    """Tokens by stage (prompt and completion, stacked) and cost by stage when any."""
    stages = {
        name: row
        for name, row in data.usage.items()
        if name != "total" and (row.get("prompt_tokens", 0) or row.get("completion_tokens", 0))
    }
    if not stages:
        return None
    order = sorted(
        stages, key=lambda s: -(stages[s].get("prompt_tokens", 0) + stages[s]["completion_tokens"])
    )
    costs = {s: float(stages[s].get("cost_usd", 0.0)) for s in order}
    has_cost = any(costs.values())
    fig, axes = _figure(1.0 + 0.35 * len(order), 2 if has_cost else 1)
    ax = axes[0]
    prompt = [float(stages[s].get("prompt_tokens", 0)) for s in order]
    completion = [float(stages[s].get("completion_tokens", 0)) for s in order]
    y = list(range(len(order)))
    ax.barh(y, prompt, color=_PALETTE[0], label="prompt")
    bars = ax.barh(y, completion, left=prompt, color=_PALETTE[3], label="completion")
    ax.bar_label(bars, labels=[f"{p + c:,.0f}" for p, c in zip(prompt, completion, strict=True)])
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_xlabel("tokens")
    ax.set_title("tokens by stage", fontsize=11)
    ax.legend(frameon=False, loc="lower right")
    _style(ax)
    if has_cost:
        corder = sorted(order, key=lambda s: -costs[s])
        _barh(
            axes[1],
            corder,
            [costs[s] for s in corder],
            colors=_PALETTE[4],
            fmt=lambda v: f"${v:.4f}",
            integer=False,
        )
        axes[1].set_xlabel("cost (USD)")
        axes[1].set_title("cost by stage", fontsize=11)
    return _png(fig, "Tokens and cost by stage")


def tir(data: RunData) -> bytes | None:
    """Per trajectory: model turns, code executions, code errors (histograms)."""
    if not data.tir:
        return None
    fig, axes = _figure(3.4, 3)
    names = ("model turns", "code executions", "code errors")
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        values = Counter(t[i] for t in data.tir)
        xs = list(range(0, max(values) + 1))
        bars = ax.bar(xs, [values[x] for x in xs], color=_LOST if i == 2 else _PALETTE[i])
        ax.bar_label(bars, labels=[str(values[x]) if values[x] else "" for x in xs], fontsize=9)
        ax.set_xticks(xs)
        _integer_ticks(ax.yaxis)
        ax.set_xlabel(f"{name} per trajectory")
        ax.set_ylabel("trajectories")
        mean = sum(t[i] for t in data.tir) / len(data.tir)
        ax.set_title(f"{name} (mean {mean:.2f})", fontsize=11)
        ax.margins(y=0.15)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return _png(fig, f"Tool use per trajectory (n = {len(data.tir)})")


CHARTS: tuple[Chart, ...] = (
    Chart("rows", "Rows by stage and outcome", rows_by_stage),
    Chart("failures", "Verification failure reasons", failures),
    Chart("rounds", "Rewrite and repair rounds needed", rounds),
    Chart("pass_rates", "Pass rate by model", pass_rates),
    Chart("lengths", "Solution length by outcome", lengths),
    Chart("difficulty", "Difficulty distribution", difficulty),
    Chart("balance", "Domain and structure balance", balance),
    Chart("tir", "Tool use per trajectory", tir),
    Chart("usage", "Tokens and cost by stage", usage),
)
"""Every chart, in the report's order."""


def render_charts(data: RunData) -> list[tuple[Chart, bytes]]:
    """The charts that have data, with their PNG bytes."""
    out: list[tuple[Chart, bytes]] = []
    for chart in CHARTS:
        png = chart.draw(data)
        if png is not None:
            out.append((chart, png))
    return out
