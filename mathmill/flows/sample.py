"""The ``sample`` flow: N solutions per problem at a temperature, with the logprobs of
their tokens, graded against the reference answers: the raw material of
reasoning selection (best-of-N, pass@k difficulty, rejection sampling).

Generation runs on :class:`~mathmill.tasks.generation.GenBackend`: an endpoint (the
embedded model by default, or a vLLM OpenAI server), the ``generate`` deployment on the
``vllm`` work pool, or vLLM in this process.

>>> SampleParams(input="problems.jsonl").samples
4
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pydantic import ConfigDict, Field

from mathmill.codec import from_table
from mathmill.flows.options import InputFields, ModelRole, StorageFields
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import Sample, SamplingParams
from mathmill.tasks.generation import GenBackend, place_roles
from mathmill.tasks.load import LoadConfig, load
from mathmill.tasks.sample import (
    STATS_COLUMNS,
    SampleConfig,
    SampleFigures,
    grade_samples,
    sample_stats,
)
from mathmill.tasks.sample import sample as sample_stage

__all__ = ["PIPELINE", "SampleParams", "SampleResult", "grade_samples", "sample"]


class SampleParams(InputFields, BudgetFields, StorageFields):
    """Parameters of the sample flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(
        "runs/sample",
        description="Run directory: local path, s3://bucket/prefix, or a path inside "
        "storage_block (re-run to resume).",
    )
    samples: int = Field(4, ge=1, le=1024, description="Solutions per problem (n).")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_tokens: int = Field(512, ge=1, le=131072, description="Tokens per solution.")
    seed: int = Field(0, ge=0, description="Sampling seed (the same seed, the same samples).")
    top_logprobs: int = Field(
        0, ge=0, le=20, description="Alternatives kept per token, besides its own logprob."
    )
    chunk_size: int = Field(
        200,
        ge=1,
        le=100_000,
        description="Problems per chunk (a task; the deployment backend takes them all in "
        "one and cuts the requests by backend.chunk_size).",
    )
    backend: GenBackend = Field(
        default_factory=GenBackend, description="Where generation runs (endpoint by default)."
    )
    model: ModelRole = Field(
        default_factory=ModelRole,
        description="The endpoint backend's model (default: the embedded model).",
    )
    concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight (endpoint).")
    dry_run: bool = Field(False, description="Validate, check the input; call nothing.")


class SampleResult(RunResult):
    """Where a sample run's outputs are, and its statistics."""

    problems: int = 0
    samples: int = 0


def _sampling(params: SampleParams) -> SamplingParams:
    return SamplingParams(
        n=params.samples,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        seed=params.seed,
        logprobs=True,
        top_logprobs=params.top_logprobs or None,
    )


def _load_chunk(params: SampleParams) -> int:
    """Problems per chunk: ``chunk_size``; on the deployment backend all of them in one
    chunk, whose requests are cut into generation chunks shared out among
    ``backend.runs`` flow runs (each loads the engine once: one chunk per sample chunk
    would load it once per chunk).
    """
    return params.chunk_size if params.backend.kind != "deployment" else 1_000_000


def _resources(params: SampleParams) -> Resources:
    roles, backends = place_roles({"sampler": (params.model, params.backend)})
    return Resources(roles=roles, backends=backends, row_concurrency=params.concurrency)


def _stats(state: RunState) -> list[dict[str, Any]]:
    """The statistics of the samples written, from the columns they need (a chunk
    written without them is read as records).
    """
    dataset = state.rt.store.dataset("samples")
    rows: list[SampleFigures] = []
    for ref in state.refs:
        if ref.dataset != "samples":
            continue
        table = dataset.read_table(ref)
        if set(STATS_COLUMNS) <= set(table.column_names):
            picked = table.select(list(STATS_COLUMNS)).to_pylist()
            rows += [SimpleNamespace(**row) for row in picked]
        else:
            rows += from_table(table, Sample)
    return sample_stats(rows, state.rows("problems"), state.rows("dropped"))


def _report(state: RunState) -> str:
    p = state.params
    return (
        f"{state.rows('problems')} problems, {p.samples} samples each, temperature "
        f"{p.temperature}, backend {p.backend.kind}."
    )


def _summary(state: RunState) -> dict[str, Any]:
    return {"problems": state.rows("problems"), "samples": state.rows("samples")}


PIPELINE: Pipeline[SampleParams, SampleResult] = Pipeline(
    name="sample",
    params=SampleParams,
    steps=[
        Step(load, lambda p: LoadConfig(**p.load_config(_load_chunk(p)))),
        Step(sample_stage, lambda p: SampleConfig(sampling=_sampling(p))),
    ],
    resources=_resources,
    result=SampleResult,
    exports=("samples", "dropped"),
    listed=("samples",),
    report=_report,
    stats=_stats,
    summary=_summary,
    ref="mathmill.flows.sample:PIPELINE",
    description="N solutions per problem with logprobs, graded against the answers.",
)
"""load → sample (generate on the sampler's backend, grade) → exports."""


@pipeline_flow("sample")
async def sample(params: SampleParams) -> SampleResult:
    """N solutions per problem with logprobs, graded against the reference answers."""
    return await run_pipeline(PIPELINE, params)
