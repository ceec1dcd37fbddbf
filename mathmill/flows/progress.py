"""Run bookkeeping for flows: counts by outcome, time per stage, the progress artifact."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from prefect.artifacts import aupdate_progress_artifact

from mathmill.tasks.runtime import StageOutput

__all__ = ["Tracker"]


class Tracker:
    """Counts, per-stage timings and the progress artifact of a run."""

    def __init__(self, total_chunks: int, *, artifacts: bool = True) -> None:
        self.artifacts = artifacts
        self.counts: Counter[str] = Counter()
        self.timings: dict[str, list[float]] = {}
        self.total = max(1, total_chunks)
        self.done = 0
        self.progress_id: Any = None

    async def run(self, stage: str, call: Awaitable[StageOutput]) -> StageOutput:
        """Await a stage's chunk, adding its counts and time to the run's."""
        start = time.perf_counter()
        out = await call
        n, reused, busy = self.timings.setdefault(stage, [0, 0, 0.0])
        self.timings[stage] = [n + 1, reused + int(out.reused), busy + time.perf_counter() - start]
        self.counts.update(out.counts)
        return out

    async def step(self, message: str, *, chunk_done: bool = True) -> None:
        """Move the progress artifact: 10% once the problems are chunked, the rest
        as chunks finish.
        """
        self.done += int(chunk_done)
        if self.artifacts and self.progress_id is not None:
            progress = min(100.0, 10.0 + 90.0 * self.done / self.total)
            await aupdate_progress_artifact(self.progress_id, progress, description=message)

    def timing_table(self) -> dict[str, tuple[int, int, float]]:
        """Stage -> (chunks, chunks reused, busy seconds)."""
        return {k: (int(v[0]), int(v[1]), v[2]) for k, v in self.timings.items()}
