"""Fan-out: a chunked stage's pending chunks spread over flow runs of the ``chunks``
deployment on a work pool, so one run uses many machines.

The run that owns the pipeline plans the stage's chunks as usual; when fan-out is on
for the stage, it waits until all of them are planned, keeps those already complete
in the run directory, and shares the rest out among ``runs`` flow runs (round robin).
Each flow run (:func:`mathmill.flows.chunks.chunks`, on any worker of the pool) opens
the pipeline's resources itself, runs its chunks through the stage's task (the same
cache key, the same idempotent output) and records its LLM usage in the run
directory. A chunk is in exactly one flow run's list, so it is done once; a killed
worker's chunks stay not done, and a re-run sends only them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import FlowRunFailed, IncompleteChunk
from mathmill.llm.usage import UsageMeter
from mathmill.pipeline.chunks import ChunkSpec, Runtime, StageOutput, _finished
from mathmill.pipeline.remote import require_server, run_and_wait

if TYPE_CHECKING:
    from mathmill.pipeline.dag import Pipeline

__all__ = ["FanOut", "FanOutFields", "fan_out_chunks", "usage_path"]


class FanOut(BaseModel):
    """Where a run's chunks execute: in its own flow run (the default) or spread over
    flow runs of a deployment on a work pool.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str | None = Field(
        None,
        description="The chunks deployment ('chunks/chunks', on the cpu pool); unset: every "
        "chunk runs in this flow run.",
        examples=["chunks/chunks"],
    )
    runs: int = Field(
        3,
        ge=1,
        le=1024,
        description="Flow runs a stage's pending chunks are shared out among (about one "
        "per worker).",
    )
    stages: list[str] | None = Field(
        None, description="Stages to fan out (default: every chunked stage)."
    )
    pool: str = Field("cpu", description="The deployment's work pool (for messages).")
    run_timeout_s: float | None = Field(
        None, gt=0, description="Give up on a flow run not finished after this long."
    )
    warn_after_s: float = Field(
        60.0, gt=0, description="Warn when no worker has picked a run up after this long."
    )

    def applies(self, stage: str) -> bool:
        """Whether ``stage``'s chunks go to the deployment."""
        return self.deployment is not None and (self.stages is None or stage in self.stages)


class FanOutFields(BaseModel):
    """The fan-out option, mixed into pipelines' params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fan_out: FanOut = Field(
        default_factory=FanOut,
        description="Spread chunked stages over flow runs on a work pool (many machines).",
    )


def usage_path(flow_run_id: str) -> str:
    """Where a chunks flow run records its LLM usage in the run directory."""
    return f".usage/{flow_run_id}.json"


async def fan_out_chunks(
    pipeline: Pipeline[Any, Any],
    stage: str,
    specs: Sequence[ChunkSpec],
    params: Any,
    fan: FanOut,
    rt: Runtime,
) -> list[StageOutput | BaseException]:
    """Run ``specs`` (chunks of ``stage``) on the deployment; per spec its output (read
    from the run directory, ``reused`` when it was complete before) or why it is not done.
    """
    assert fan.deployment is not None
    store = rt.store
    before = {s.key for s in specs if _finished(store, s) is not None}
    pending = [s for s in specs if s.key not in before]
    errors: dict[str, BaseException] = {}
    if pending:
        require_server(f"fan_out of stage {stage}", fan.pool)
        groups = [pending[i :: fan.runs] for i in range(min(fan.runs, len(pending)))]
        where = params.out if getattr(params, "storage_block", None) else store.url
        run = params.model_copy(update={"out": where}).model_dump(mode="json")
        runs = [
            run_and_wait(
                fan.deployment,
                {
                    "params": {
                        "pipeline": pipeline.ref,
                        "stage": stage,
                        "specs": [s.model_dump(mode="json") for s in group],
                        "run": run,
                    }
                },
                kind="chunks",
                pool=fan.pool,
                run_timeout_s=fan.run_timeout_s,
                warn_after_s=fan.warn_after_s,
            )
            for group in groups
        ]
        results = await asyncio.gather(*runs, return_exceptions=True)
        for group, result in zip(groups, results, strict=True):
            if isinstance(result, BaseException):
                errors.update((s.key, result) for s in group)
                if isinstance(result, FlowRunFailed) and result.flow_run_id:
                    _merge_usage(rt, result.flow_run_id)  # what it paid counts too
            else:
                _merge_usage(rt, result)
    outs: list[StageOutput | BaseException] = []
    for spec in specs:
        done = _finished(store, spec)
        if done is not None:
            outs.append(done.model_copy(update={"reused": spec.key in before}))
        else:
            outs.append(
                errors.get(spec.key)
                or IncompleteChunk(
                    f"stage {stage}, chunk {spec.key}: its flow run ended without writing it; "
                    "re-run to resume"
                )
            )
    return outs


def _merge_usage(rt: Runtime, flow_run_id: str) -> None:
    """Add a chunks flow run's recorded LLM usage to this run's meter."""
    path = usage_path(flow_run_id)
    if rt.store.exists(path):
        rt.pool.meter.merge(UsageMeter.from_summary(json.loads(rt.store.read_bytes(path))))
