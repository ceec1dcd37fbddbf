"""The ``critique`` flow: N solutions per problem from each of several models, merged
per problem, filtered to the problems the models do not all agree on, and turned into
right/wrong critique training data in verl's RL format.

load → critique_sample (every model, each on its backend: an endpoint, vLLM here, or
the ``generate`` deployment on the vllm pool) → merge (per-model flags, the
consistency filter, K examples per problem balanced right/wrong) → teacher (optional
explanations that agree with the grader) → ``critique.parquet`` (verl),
``critique.jsonl``, ``critique_sft.jsonl``, ``distribution.json``.

>>> p = CritiqueParams(input="problems.jsonl", model_names=["a", "b"])
>>> [m.name for m in p.all_models()], p.samples, p.temperature, p.per_problem
(['a', 'b'], 8, 0.7, 4)
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mathmill.flows.options import InputFields, ModelRole, StorageFields
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import CritiqueExample, SamplingParams
from mathmill.tasks.critique import (
    KEEP_RULES,
    CritiqueSampleConfig,
    KeepRule,
    MergeConfig,
    TeacherConfig,
    critique_sample,
    distribution,
    merge,
    model_role,
    teacher,
    verl_row,
)
from mathmill.tasks.generation import GenBackend, place_roles
from mathmill.tasks.load import LoadConfig, load

__all__ = ["PIPELINE", "CritiqueModel", "CritiqueParams", "CritiqueResult", "critique"]

ENDPOINT_CHUNK = 200


class CritiqueModel(BaseModel):
    """One model of the list: a name (its role is ``model.<name>``), the model behind
    it and where it generates.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=64,
        description="Letters, digits, '_', '.', '-' (it names the model's chunks); the "
        "served model's own name goes in `model.model`.",
    )
    model: ModelRole = Field(
        default_factory=ModelRole,
        description="Its endpoint model (endpoint backend; unset fields from `endpoint`).",
    )
    backend: GenBackend = Field(
        default_factory=GenBackend, description="Where it generates (endpoint by default)."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Its sampling temperature (default: temperature)."
    )


def model_key(served: str) -> str:
    """A served model's name as a name of the list (``Qwen/Qwen2.5-7B`` ->
    ``Qwen_Qwen2.5-7B``): what chunk keys allow.
    """
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", served).strip("_.-") or "model"
    return key[:64]


class CritiqueParams(InputFields, BudgetFields, StorageFields):
    """Parameters of the critique flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field("runs/critique", description="Run directory (re-run to resume).")
    model_names: list[str] = Field(
        default_factory=list,
        description="Served model names on `endpoint` (the shortest way to list models).",
    )
    models: list[CritiqueModel] = Field(
        default_factory=list,
        description="Models with their own backend or temperature (after model_names). "
        "None at all: the embedded model, once.",
    )
    endpoint: ModelRole = Field(
        default_factory=ModelRole,
        description="The endpoint the models are served by (default: the embedded model).",
    )
    samples: int = Field(8, ge=1, le=1024, description="Solutions per problem per model.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1, le=131072, description="Tokens per solution.")
    seed: int = Field(0, ge=0, description="Sampling and drawing seed.")
    keep: KeepRule = Field(
        "any_mixed",
        description="The consistency filter: "
        + "; ".join(f"'{k}': {v}" for k, v in KEEP_RULES.items()),
    )
    per_problem: int = Field(4, ge=1, le=1024, description="Critique examples per problem (K).")
    balance: bool = Field(True, description="Balance right and wrong examples where possible.")
    data_source: str = Field(
        "{source}_critique",
        description="verl's data_source; {source} is the problem's source (its row's "
        "`source`, else the input's name) as a slug: lower case, [a-z0-9_] only.",
    )
    teacher: bool = Field(False, description="Have a teacher model explain each example.")
    teacher_model: ModelRole = Field(
        default_factory=ModelRole,
        description="The teacher (unset fields from `endpoint`); only explanations whose "
        "conclusion agrees with the grader are kept.",
    )
    teacher_sees_reference: bool = Field(True, description="Tell the teacher the right answer.")
    teacher_max_tokens: int = Field(512, ge=16, le=131072)
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Problems per chunk (default: 200; all in one when a model is on vLLM: "
        "the engine loads once; the deployment backend's generation chunks are then shared "
        "out among runs).",
    )
    concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight (endpoints).")
    dry_run: bool = Field(False, description="Validate, check the input; call nothing.")

    @model_validator(mode="after")
    def _distinct_names(self) -> CritiqueParams:
        names = [m.name for m in self.all_models()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"models: names must be distinct ({', '.join(twice)} twice)")
        try:
            self.data_source.format(source="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                "data_source: only {source} may be filled in (a literal brace is {{ or }})"
            ) from None
        return self

    def all_models(self) -> list[CritiqueModel]:
        """The models in order: ``model_names``, then ``models``; the embedded model
        alone when neither is given.
        """
        named = [
            CritiqueModel(name=model_key(n), model=ModelRole(model=n)) for n in self.model_names
        ]
        return named + list(self.models) or [CritiqueModel(name="default")]

    def on_vllm(self) -> bool:
        """Whether a model generates on vLLM (here or on the vllm pool)."""
        return any(m.backend.kind != "endpoint" for m in self.all_models())

    def load_chunk(self) -> int:
        """Problems per chunk (see ``chunk_size``)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return 1_000_000 if self.on_vllm() else ENDPOINT_CHUNK


class CritiqueResult(RunResult):
    """Where a critique run's outputs are, and its headline figures."""

    problems: int = 0
    samples: int = 0
    kept: int = 0
    examples: int = 0
    right: int = 0
    wrong: int = 0


def _sample_config(p: CritiqueParams) -> CritiqueSampleConfig:
    models = p.all_models()
    return CritiqueSampleConfig(
        models=tuple(m.name for m in models),
        temperatures=tuple(m.temperature for m in models),
        sampling=SamplingParams(
            n=p.samples,
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            seed=p.seed,
        ),
        engine_in_process=any(m.backend.kind == "engine" for m in models),
    )


def _merge_config(p: CritiqueParams) -> MergeConfig:
    return MergeConfig(
        models=tuple(m.name for m in p.all_models()),
        keep=p.keep,
        per_problem=p.per_problem,
        balance=p.balance,
        seed=p.seed,
        data_source=p.data_source,
        problems_per_chunk=p.load_chunk(),
    )


def _teacher_config(p: CritiqueParams) -> TeacherConfig:
    return TeacherConfig(
        enabled=p.teacher,
        sees_reference=p.teacher_sees_reference,
        sampling=SamplingParams(temperature=0.0, max_tokens=p.teacher_max_tokens, seed=p.seed),
    )


def _resources(p: CritiqueParams) -> Resources:
    roles, backends = place_roles(
        {model_role(m.name): (m.model.over(p.endpoint), m.backend) for m in p.all_models()}
    )
    if p.teacher:
        roles["teacher"] = p.teacher_model.over(p.endpoint)
    return Resources(
        roles=roles,
        backends=backends,
        row_concurrency=p.concurrency,
        # vLLM in this process holds one engine at a time: one chunk at a time
        chunk_concurrency=1 if any(m.backend.kind == "engine" for m in p.all_models()) else 4,
    )


def _critiques(state: RunState) -> list[CritiqueExample]:
    return sorted(state.read("critiques", CritiqueExample), key=lambda r: r.position)


def _exports(state: RunState) -> dict[str, str]:
    """``critique.parquet`` (verl's layout, written with ``datasets``), the same rows as
    ``critique_verl.jsonl``, ``critique_sft.jsonl`` (chat messages, the teacher's agreed
    critiques only) and ``distribution.json``.
    """
    from mathmill.export.formats import write_parquet

    store = state.rt.store
    rows = _critiques(state)
    verl = [verl_row(e, i) for i, e in enumerate(rows)]
    outputs: dict[str, str] = {}
    if verl:
        outputs["critique.parquet"] = write_parquet(store, "critique.parquet", verl)
    lines = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in verl)
    outputs["critique_verl.jsonl"] = store.write_bytes("critique_verl.jsonl", lines)
    sft = [
        {
            "messages": [
                {"role": "user", "content": e.prompt},
                {"role": "assistant", "content": e.critique},
            ],
            "target": e.target,
            "id": e.id,
        }
        for e in rows
        if e.critique is not None
    ]
    if sft:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in sft)
        outputs["critique_sft.jsonl"] = store.write_bytes("critique_sft.jsonl", data)
    dist = json.dumps(_distribution(state), indent=2, ensure_ascii=False).encode()
    outputs["distribution.json"] = store.write_bytes("distribution.json", dist)
    return outputs


def _distribution(state: RunState) -> dict[str, Any]:
    out = distribution(_critiques(state))
    counts = state.tracker.counts
    out["filter"] = {
        "rule": state.params.keep,
        **{
            k.removeprefix("merge."): v
            for k, v in sorted(counts.items())
            if k.startswith(("merge.kept.", "merge.dropped."))
        },
    }
    return out


def _stats(state: RunState) -> list[dict[str, Any]]:
    dist = _distribution(state)
    rows: list[dict[str, Any]] = [
        {"metric": "problems", "value": state.rows("problems")},
        {"metric": "samples", "value": state.rows("samples")},
    ]
    rows += [
        {"metric": f"filter: {k}", "value": v} for k, v in dist["filter"].items() if k != "rule"
    ]
    overall = dist["overall"]
    rows += [
        {"metric": "critique examples", "value": overall["examples"]},
        {"metric": "right / wrong", "value": f"{overall['right']} / {overall['wrong']}"},
    ]
    for name, d in dist["per_model"].items():
        rows.append({"metric": f"{name}: right / wrong", "value": f"{d['right']} / {d['wrong']}"})
    if "teacher" in dist:
        t = dist["teacher"]
        rows.append({"metric": "teacher critiques kept", "value": f"{t['kept']} / {t['examples']}"})
    return rows


def _report(state: RunState) -> str:
    overall = _distribution(state)["overall"]
    names = ", ".join(m.name for m in state.params.all_models())
    return (
        f"{state.rows('problems')} problems sampled by {names} "
        f"({state.params.samples} each); rule `{state.params.keep}`: {_kept(state)} problems "
        f"kept; {overall['examples']} critique examples ({overall['right']} right, "
        f"{overall['wrong']} wrong). The balance per model and per source is in "
        "`distribution.json`."
    )


def _kept(state: RunState) -> int:
    return sum(v for k, v in state.tracker.counts.items() if k.startswith("merge.kept."))


def _summary(state: RunState) -> dict[str, Any]:
    overall = _distribution(state)["overall"]
    return {
        "problems": state.rows("problems"),
        "samples": state.rows("samples"),
        "kept": _kept(state),
        "examples": overall["examples"],
        "right": overall["right"],
        "wrong": overall["wrong"],
    }


PIPELINE: Pipeline[CritiqueParams, CritiqueResult] = Pipeline(
    name="critique",
    params=CritiqueParams,
    steps=[
        Step(load, lambda p: LoadConfig(**p.load_config(p.load_chunk()))),
        Step(critique_sample, _sample_config),
        Step(merge, _merge_config),
        Step(teacher, _teacher_config),
    ],
    resources=_resources,
    result=CritiqueResult,
    exports=("samples", "merged", "critiques", "dropped"),
    listed=("samples", "critiques"),
    extra_exports=_exports,
    report=_report,
    stats=_stats,
    summary=_summary,
    ref="mathmill.flows.critique:PIPELINE",
    description="Samples from several models → consistency filter → right/wrong critique data.",
)
"""load → critique_sample → merge → teacher → exports (verl parquet, JSONL)."""


@pipeline_flow("critique")
async def critique(params: CritiqueParams) -> CritiqueResult:
    """N samples per problem from each model, merged and filtered by consistency,
    turned into right/wrong critique examples in verl's format.
    """
    return await run_pipeline(PIPELINE, params)
