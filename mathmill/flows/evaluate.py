"""The ``evaluate`` flow: a model (any backend) on a split written by ``curate``
(``test.jsonl``, or any problems file): accuracy overall, by difficulty bucket, by
domain and by structure tag with 95% intervals; failure patterns with examples;
``evaluation.json``, a table artifact and the report.

>>> EvaluateParams(input="runs/curate/test.jsonl").samples
1
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ConfigDict, Field

from mathmill.flows.options import InputFields, ModelRole, StorageFields
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import Problem, Sample, SamplingParams
from mathmill.tasks.evaluate import evaluate_samples, metric_rows
from mathmill.tasks.generation import GenBackend, place_roles
from mathmill.tasks.load import LoadConfig, load
from mathmill.tasks.sample import SampleConfig
from mathmill.tasks.sample import sample as sample_stage

__all__ = ["PIPELINE", "EvaluateParams", "EvaluateResult", "evaluate"]


class EvaluateParams(InputFields, BudgetFields, StorageFields):
    """Parameters of the evaluate flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field("runs/evaluate", description="Run directory (re-run to resume).")
    samples: int = Field(1, ge=1, le=256, description="Answers per problem.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(1024, ge=16, le=131072)
    seed: int = Field(0, ge=0)
    chunk_size: int = Field(200, ge=1, le=100_000, description="Problems per chunk.")
    concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight.")
    backend: GenBackend = Field(default_factory=GenBackend, description="Where it generates.")
    model: ModelRole = Field(
        default_factory=ModelRole, description="The model (default: the embedded model)."
    )
    dry_run: bool = Field(False, description="Validate, check the input; call nothing.")


class EvaluateResult(RunResult):
    """Where an evaluation is, and its headline figures."""

    problems: int = 0
    samples: int = 0
    accuracy: float | None = None


def _evaluation(state: RunState) -> dict[str, Any]:
    """The run's evaluation, computed once at the end (the exports, report, statistics
    and result all read it).
    """
    cached: dict[str, Any] | None = state.rt.extra.get("evaluation")
    if cached is None:
        problems, samples = state.read("problems", Problem), state.read("samples", Sample)
        cached = state.rt.extra["evaluation"] = evaluate_samples(problems, samples)
    return cached


def _exports(state: RunState) -> dict[str, str]:
    evaluation = dict(_evaluation(state))
    params = state.params
    engine = params.backend.engine if params.backend.kind != "endpoint" else None
    evaluation["model"] = engine.model if engine is not None else params.model.model or "embedded"
    evaluation["backend"] = params.backend.kind
    data = json.dumps(evaluation, indent=2, ensure_ascii=False).encode()
    return {"evaluation.json": state.rt.store.write_bytes("evaluation.json", data)}


def _report(state: RunState) -> str:
    ev = _evaluation(state)["overall"]
    low, high = ev["ci95"]
    return (
        f"{ev['problems']} problems, {ev['graded']} graded answers: accuracy "
        f"{ev['accuracy']} (95% CI {low}-{high}); per bucket, domain, structure tag and "
        "failure pattern in `evaluation.json` and the table below."
    )


def _summary(state: RunState) -> dict[str, Any]:
    ev = _evaluation(state)["overall"]
    return {"problems": ev["problems"], "samples": ev["samples"], "accuracy": ev["accuracy"]}


def _resources(p: EvaluateParams) -> Resources:
    roles, backends = place_roles({"sampler": (p.model, p.backend)})
    return Resources(roles=roles, backends=backends, row_concurrency=p.concurrency)


PIPELINE: Pipeline[EvaluateParams, EvaluateResult] = Pipeline(
    name="evaluate",
    params=EvaluateParams,
    steps=[
        Step(load, lambda p: LoadConfig(**p.load_config(p.chunk_size))),
        Step(
            sample_stage,
            lambda p: SampleConfig(
                sampling=SamplingParams(
                    n=p.samples, temperature=p.temperature, max_tokens=p.max_tokens, seed=p.seed
                )
            ),
        ),
    ],
    resources=_resources,
    result=EvaluateResult,
    exports=("samples", "dropped"),
    listed=("samples",),
    extra_exports=_exports,
    report=_report,
    stats=lambda state: metric_rows(_evaluation(state)),
    summary=_summary,
    ref="mathmill.flows.evaluate:PIPELINE",
    description="A model on a split: accuracy by bucket, domain and structure, failures.",
)
"""load → sample (grade) → evaluation.json, metrics table."""


@pipeline_flow("evaluate")
async def evaluate(params: EvaluateParams) -> EvaluateResult:
    """Evaluate a model on a split: accuracy by bucket, domain and structure tag."""
    return await run_pipeline(PIPELINE, params)
