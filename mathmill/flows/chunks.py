"""The ``chunks`` flow: a worker's share of a fanned-out stage.

A pipeline run with ``fan_out.deployment`` set sends each chunked stage's pending
chunks to flow runs of this flow's deployment (on the ``cpu`` pool); each one opens
the pipeline's resources (endpoints, sandbox, run directory) on its worker, runs its
chunks through the stage's task (the same cache key and idempotent output as in the
pipeline's own flow run) and records its LLM usage in the run directory for the
pipeline's report. See :mod:`mathmill.pipeline.fanout`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from mathmill import sidecar
from mathmill.errors import ConfigError, IncompleteRun
from mathmill.flows.registry import PIPELINES
from mathmill.pipeline.chunks import ChunkSpec, Runtime, StageOutput, prompt_hashes, use_runtime
from mathmill.pipeline.dag import Pipeline, open_pipeline_runtime
from mathmill.pipeline.fanout import usage_path
from mathmill.pipeline.flow import pipeline_flow
from mathmill.pipeline.stage import Stage
from mathmill.tasks.export import write_run_file

__all__ = ["ChunksParams", "ChunksResult", "chunks", "load_pipeline"]


class ChunksParams(BaseModel):
    """One flow run's share of a stage's chunks. Pipelines fill them in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str = Field(description="A pipeline name, or its 'module:attribute'.")
    stage: str = Field(description="The stage whose chunks these are.")
    specs: list[ChunkSpec] = Field(description="The chunks to run.")
    run: dict[str, Any] = Field(description="The pipeline run's params.")


class ChunksResult(BaseModel):
    """What one chunks flow run did."""

    chunks: int = 0
    reused: int = 0
    counts: dict[str, int] = Field(default_factory=dict)


def load_pipeline(ref: str) -> Pipeline[Any, Any]:
    """The registered pipeline named ``ref`` (its name, or its ``module:attribute``).
    Only registered pipelines: a flow-run parameter never imports an arbitrary module.
    """
    known = PIPELINES.get(ref) or next((e for e in PIPELINES.values() if e.ref == ref), None)
    if known is None:
        names = ", ".join(sorted(PIPELINES))
        raise ConfigError(f"pipeline {ref!r} is not registered (flows/registry.py: {names})")
    module, _, attribute = known.ref.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"pipeline {ref!r}: cannot import it ({e})") from e
    if not isinstance(found, Pipeline):
        raise ConfigError(f"pipeline {ref!r}: {type(found).__name__} is not a Pipeline")
    return found


def check_spec(stage: Stage[Any], spec: ChunkSpec, rt: Runtime) -> None:
    """Refuse a chunk this worker would compute differently from the run that planned
    it: another run directory (not shared with this machine), other stage code (another
    mathmill version installed here) or other prompt files.
    """
    where = f"stage {stage.name}, chunk {spec.key}"
    if spec.store_url != rt.store.url:
        raise ConfigError(
            f"{where} belongs to {spec.store_url}, but this worker opened {rt.store.url}: "
            "workers need the run directory on object storage or a storage_block"
        )
    if spec.code != stage.code:
        raise ConfigError(
            f"{where}: this worker's mathmill code differs from the run's (another "
            "version installed?); install the same version on every worker"
        )
    if spec.prompts != prompt_hashes(*stage.prompts):
        raise ConfigError(f"{where}: this worker's prompt templates differ from the run's")


@pipeline_flow("chunks")
async def chunks(params: ChunksParams) -> ChunksResult:
    """Run a share of a fanned-out stage's chunks on this worker."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    pipeline = load_pipeline(params.pipeline)
    run_params = pipeline.params.model_validate(params.run)
    step = pipeline.step(params.stage)
    sidecar.warm(*step.stage.warm)  # the helper imports what the stage's side work needs
    stage_params = step.params(run_params)
    task = run_params.with_results(step.stage.task)
    result = ChunksResult(chunks=len(params.specs))
    async with open_pipeline_runtime(pipeline, run_params) as (rt, res):
        with use_runtime(rt):
            gate = asyncio.Semaphore(res.chunk_concurrency)
            usage = usage_path(str(flow_run.id))

            def record() -> None:  # what this run paid, for the pipeline's report and budget
                summary = json.dumps(rt.pool.meter.summary()).encode()
                write_run_file(rt.store, usage, summary, failed=True)

            async def one(spec: ChunkSpec) -> StageOutput:
                async with gate:
                    check_spec(step.stage, spec, rt)
                    try:
                        out: StageOutput = await task(spec, stage_params)
                    finally:
                        record()
                    return out

            try:
                outs = await asyncio.gather(*(one(s) for s in params.specs), return_exceptions=True)
            finally:
                record()
    failures = [o for o in outs if isinstance(o, BaseException)]
    for out in outs:
        if isinstance(out, StageOutput):
            result.reused += int(out.reused)
            for key, n in out.counts.items():
                result.counts[key] = result.counts.get(key, 0) + n
    logger.info(
        "%s %s: %d chunks (%d done before), %d failed",
        pipeline.name,
        params.stage,
        result.chunks,
        result.reused,
        len(failures),
    )
    if failures:
        raise IncompleteRun(
            f"{pipeline.name} {params.stage}: {len(failures)} of {len(params.specs)} chunks "
            f"did not finish (first: {failures[0]}); re-run the pipeline to resume"
        ) from failures[0]
    return result
