"""Usage accounting: tokens, latency, retries, errors and cost, per stage and per run."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["StageUsage", "UsageMeter"]


@dataclass
class StageUsage:
    """Totals for one stage (or for the whole run)."""

    calls: int = 0
    cached: int = 0
    errors: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    models: set[str] = field(default_factory=set)

    def add(self, other: StageUsage) -> None:
        """Add another stage's totals into this one."""
        self.calls += other.calls
        self.cached += other.cached
        self.errors += other.errors
        self.retries += other.retries
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.latency_ms += other.latency_ms
        self.cost_usd += other.cost_usd
        self.models |= other.models

    @property
    def mean_latency_ms(self) -> float:
        """Average latency of a call, retries and waits included."""
        return self.latency_ms / self.calls if self.calls else 0.0


class UsageMeter:
    """Thread-safe usage totals keyed by stage name.

    >>> meter = UsageMeter()
    >>> meter.record("cot", model="m", prompt_tokens=10, completion_tokens=5, latency_ms=3.0)
    >>> meter.total().prompt_tokens
    10
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: dict[str, StageUsage] = {}

    def record(
        self,
        stage: str,
        *,
        model: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        latency_ms: float = 0.0,
        cost_usd: float = 0.0,
        retries: int = 0,
        error: bool = False,
        cached: bool = False,
    ) -> None:
        """Add one call's figures to ``stage``. A ``cached`` call (replayed from the call
        cache, not sent) counts only as cached: its tokens and cost were paid before.
        """
        with self._lock:
            s = self._stages.get(stage)
            if s is None:  # not setdefault: that builds a StageUsage on every call
                s = self._stages[stage] = StageUsage()
            if cached:
                s.cached += 1
                s.models.add(model)
                return
            s.calls += 1
            s.errors += int(error)
            s.retries += retries
            s.prompt_tokens += prompt_tokens
            s.completion_tokens += completion_tokens
            s.latency_ms += latency_ms
            s.cost_usd += cost_usd
            s.models.add(model)

    def stages(self) -> dict[str, StageUsage]:
        """A copy of the per-stage totals."""
        with self._lock:
            return {name: _copy(s) for name, s in self._stages.items()}

    def total(self) -> StageUsage:
        """The run's totals over all stages."""
        total = StageUsage()
        for s in self.stages().values():
            total.add(s)
        return total

    def merge(self, other: UsageMeter) -> None:
        """Add another meter's stages into this one (e.g. from a worker)."""
        for name, s in other.stages().items():
            with self._lock:
                self._stages.setdefault(name, StageUsage()).add(s)

    @classmethod
    def from_summary(cls, summary: dict[str, dict[str, float]]) -> UsageMeter:
        """A meter holding what :meth:`summary` wrote (another process's usage).

        >>> meter = UsageMeter()
        >>> meter.record("cot", model="m", prompt_tokens=10, latency_ms=4.0)
        >>> UsageMeter.from_summary(meter.summary()).summary() == meter.summary()
        True
        """
        meter = cls()
        for name, row in summary.items():
            if name == "total":
                continue
            calls = int(row.get("calls", 0))
            meter._stages[name] = StageUsage(
                calls=calls,
                cached=int(row.get("cached", 0)),
                errors=int(row.get("errors", 0)),
                retries=int(row.get("retries", 0)),
                prompt_tokens=int(row.get("prompt_tokens", 0)),
                completion_tokens=int(row.get("completion_tokens", 0)),
                latency_ms=float(row.get("mean_latency_ms", 0.0)) * calls,
                cost_usd=float(row.get("cost_usd", 0.0)),
            )
        return meter

    def summary(self) -> dict[str, dict[str, float]]:
        """Per-stage figures and ``total`` as plain numbers (for results and JSON)."""
        rows = [*self.stages().items(), ("total", self.total())]
        return {
            name: {
                "calls": s.calls,
                "cached": s.cached,
                "errors": s.errors,
                "retries": s.retries,
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "mean_latency_ms": round(s.mean_latency_ms, 1),
                "cost_usd": s.cost_usd,
            }
            for name, s in rows
        }

    def to_markdown(self) -> str:
        """A markdown table of the stages and the total (for Prefect artifacts)."""
        header = (
            "| stage | calls | cached | errors | retries | prompt tok | completion tok "
            "| mean ms | USD |"
        )
        lines = [header, "|" + "---|" * 9]
        rows = [*self.stages().items(), ("**total**", self.total())]
        for name, s in rows:
            lines.append(
                f"| {name} | {s.calls} | {s.cached} | {s.errors} | {s.retries} | "
                f"{s.prompt_tokens} | {s.completion_tokens} | "
                f"{s.mean_latency_ms:.0f} | {s.cost_usd:.4f} |"
            )
        return "\n".join(lines)


def _copy(s: StageUsage) -> StageUsage:
    c = StageUsage()
    c.add(s)
    return c
