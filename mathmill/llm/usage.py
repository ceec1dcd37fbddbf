"""Usage accounting: tokens, latency, retries, errors and cost per stage and per run,
engine (GPU) and sandbox seconds, and the run's spending limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["SpendLimit", "StageUsage", "UsageMeter"]


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
    gpu_s: float = 0.0
    """Seconds the vLLM engine spent generating (engine and deployment backends)."""
    sandbox_s: float = 0.0
    """Seconds of code run in the sandbox (wall time of each execution)."""
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
        self.gpu_s += other.gpu_s
        self.sandbox_s += other.sandbox_s
        self.models |= other.models

    @property
    def mean_latency_ms(self) -> float:
        """Average latency of a call, retries and waits included."""
        return self.latency_ms / self.calls if self.calls else 0.0


@dataclass
class SpendLimit:
    """A cap on what a run pays for: tokens sent and generated (cache replays are free)
    and USD, with what the run directory spent before this process started.
    """

    max_usd: float | None = None
    max_tokens: int | None = None
    usd_before: float = 0.0
    tokens_before: int = 0


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
        self._paid_tokens = 0  # running totals, for the budget check before each call
        self._paid_usd = 0.0
        self.limit: SpendLimit | None = None
        """The run's budget (set when the run starts); :meth:`budget_reached` checks it."""

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
            self._paid_tokens += prompt_tokens + completion_tokens
            self._paid_usd += cost_usd

    def _stage(self, stage: str) -> StageUsage:
        s = self._stages.get(stage)
        if s is None:
            s = self._stages[stage] = StageUsage()
        return s

    def record_gpu(self, stage: str, seconds: float) -> None:
        """Add the vLLM engine's generation time of a batch to ``stage``."""
        with self._lock:
            self._stage(stage).gpu_s += seconds

    def record_sandbox(self, stage: str, seconds: float) -> None:
        """Add one sandbox execution's seconds to ``stage`` (e.g. ``verify.exec``).

        >>> meter = UsageMeter()
        >>> meter.record_sandbox("tir.exec", 0.25)
        >>> meter.summary()["total"]["sandbox_s"]
        0.25
        """
        with self._lock:
            self._stage(stage).sandbox_s += seconds

    def spent(self) -> tuple[int, float]:
        """Tokens and USD paid for: by this process, plus before it (:attr:`limit`)."""
        before = self.limit or SpendLimit()
        return before.tokens_before + self._paid_tokens, before.usd_before + self._paid_usd

    def budget_reached(self) -> str | None:
        """Why no more calls may be paid for (the budget is spent), or None.

        >>> meter = UsageMeter()
        >>> meter.limit = SpendLimit(max_tokens=100, tokens_before=90)
        >>> meter.budget_reached() is None
        True
        >>> meter.record("cot", model="m", prompt_tokens=6, completion_tokens=4)
        >>> meter.budget_reached()
        'token budget reached: spent 100 of 100 tokens'
        """
        limit = self.limit
        if limit is None or (limit.max_tokens is None and limit.max_usd is None):
            return None
        tokens, usd = self.spent()
        if limit.max_tokens is not None and tokens >= limit.max_tokens:
            return f"token budget reached: spent {tokens} of {limit.max_tokens} tokens"
        if limit.max_usd is not None and usd >= limit.max_usd:
            return f"budget reached: spent ${usd:.4f} of ${limit.max_usd:.4f}"
        return None

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
                self._paid_tokens += s.prompt_tokens + s.completion_tokens
                self._paid_usd += s.cost_usd

    @classmethod
    def from_summary(cls, summary: dict[str, dict[str, float]]) -> UsageMeter:
        """A meter holding what :meth:`summary` wrote (another process's usage).

        >>> meter = UsageMeter()
        >>> meter.record("cot", model="m", prompt_tokens=10, latency_ms=4.0)
        >>> meter.record_gpu("cot", 1.5)
        >>> UsageMeter.from_summary(meter.summary()).summary() == meter.summary()
        True
        """
        meter = cls()
        for name, row in summary.items():
            if name == "total":
                continue
            calls = int(row.get("calls", 0))
            s = meter._stages[name] = StageUsage(
                calls=calls,
                cached=int(row.get("cached", 0)),
                errors=int(row.get("errors", 0)),
                retries=int(row.get("retries", 0)),
                prompt_tokens=int(row.get("prompt_tokens", 0)),
                completion_tokens=int(row.get("completion_tokens", 0)),
                latency_ms=float(row.get("mean_latency_ms", 0.0)) * calls,
                cost_usd=float(row.get("cost_usd", 0.0)),
                gpu_s=float(row.get("gpu_s", 0.0)),
                sandbox_s=float(row.get("sandbox_s", 0.0)),
            )
            meter._paid_tokens += s.prompt_tokens + s.completion_tokens
            meter._paid_usd += s.cost_usd
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
                "gpu_s": round(s.gpu_s, 3),
                "sandbox_s": round(s.sandbox_s, 3),
            }
            for name, s in rows
        }

    def to_markdown(self) -> str:
        """A markdown table of the stages and the total (for Prefect artifacts)."""
        header = (
            "| stage | calls | cached | errors | retries | prompt tok | completion tok "
            "| mean ms | USD | GPU s | sandbox s |"
        )
        lines = [header, "|" + "---|" * 11]
        rows = [*self.stages().items(), ("**total**", self.total())]
        for name, s in rows:
            lines.append(
                f"| {name} | {s.calls} | {s.cached} | {s.errors} | {s.retries} | "
                f"{s.prompt_tokens} | {s.completion_tokens} | "
                f"{s.mean_latency_ms:.0f} | {s.cost_usd:.4f} | {s.gpu_s:.1f} | {s.sandbox_s:.1f} |"
            )
        return "\n".join(lines)


def _copy(s: StageUsage) -> StageUsage:
    c = StageUsage()
    c.add(s)
    return c
