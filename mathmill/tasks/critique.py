"""The critique stages: N samples per problem from each model in a list, merged per
problem with per-model consistency flags, filtered to the problems the models do not
all agree on, turned into right/wrong critique examples (balanced, seeded), optionally
explained by a teacher model; and the verl rows they are exported as.

>>> keep_decision({"a": ModelTally(right=2, wrong=0, flag="all_right")}, "any_mixed")
(False, 'all_right')
>>> parse_conclusion("The sum is off by one.\\nConclusion: wrong [END]")
'wrong'
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mathmill import sidecar
from mathmill.pipeline.chunks import Runtime, fingerprint, raise_if_transient, split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.prompts import load_prompt
from mathmill.records import (
    ConsistencyFlag,
    CritiqueExample,
    CritiqueTarget,
    ErrorInfo,
    GenRequest,
    MergedProblem,
    ModelTally,
    Problem,
    Sample,
    SamplingParams,
    stable_id,
)
from mathmill.tasks.generation import generate, role_model
from mathmill.tasks.sample import agrade_samples, sample_requests

__all__ = [
    "KEEP_RULES",
    "CritiqueSampleConfig",
    "KeepRule",
    "MergeConfig",
    "TeacherConfig",
    "critique_example",
    "critique_sample",
    "distribution",
    "engine_groups",
    "graded",
    "keep_decision",
    "merge",
    "model_role",
    "parse_conclusion",
    "pick_examples",
    "source_slug",
    "tally",
    "teacher",
    "verl_row",
]

KeepRule = Literal["any_mixed", "disagree", "all"]
KEEP_RULES: dict[str, str] = {
    "any_mixed": "keep a problem when at least one model is mixed (right and wrong samples)",
    "disagree": "keep when some sample is right and some wrong, over all models together "
    "(a mixed model, or models that each agree with themselves but not with each other)",
    "all": "keep every problem with a graded sample",
}
GRADED = ("correct", "incorrect", "no_answer")
_CONCLUSION = re.compile(r"conclusion[\s*_`]*[:：][\s*_`]*(right|wrong)\b", re.IGNORECASE)


def model_role(name: str) -> str:
    """The role of model ``name`` of the run's list."""
    return f"model.{name}"


# -- sample ---------------------------------------------------------------------------


class CritiqueSampleConfig(BaseModel):
    """How each model samples: the shared sampling, per-model temperatures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] = Field(min_length=1)
    sampling: SamplingParams
    temperatures: tuple[float | None, ...] = Field(
        (), description="Per model, a temperature instead of the sampling's (None: keep)."
    )
    engine_in_process: bool = Field(
        False, description="A model runs vLLM in this process: models take turns."
    )
    rows_per_chunk: int = Field(2000, ge=1)


@stage(
    "critique_sample",
    params=CritiqueSampleConfig,
    roles=("model.*",),
    prompts=("sample_system",),
    inputs={"problems": Problem},
    outputs={"samples": Sample},
    warm=sidecar.GRADING,
)
async def critique_sample(chunk: Chunk, cfg: CritiqueSampleConfig) -> StageResult:
    """A chunk of problems sampled by every model (each on its own backend: an
    endpoint, vLLM here, or the ``generate`` deployment, whose generation chunks are
    shared out among flow runs and kept one by one), each sample graded against the
    reference answer and named by its model.
    """
    problems: list[Problem] = chunk.rows("problems")
    position = {name: i for i, name in enumerate(cfg.models)}

    def sampling_of(name: str) -> SamplingParams:
        i = position[name]
        own = cfg.temperatures[i] if i < len(cfg.temperatures) else None
        return cfg.sampling if own is None else cfg.sampling.model_copy(update={"temperature": own})

    async def one(group: list[str]) -> list[tuple[str, list[Sample], list[ErrorInfo]]]:
        """One generation call for models on the same engine (one load, one batch)."""
        requests: list[GenRequest] = []
        for name in group:
            for r in sample_requests(problems, sampling_of(name)):
                requests.append(
                    r if len(group) == 1 else r.model_copy(update={"id": f"{r.id}@{name}"})
                )
        stage = f"critique_sample.{group[0]}" + (f".x{len(group)}" if len(group) > 1 else "")
        gens = await generate(chunk.rt, model_role(group[0]), requests, stage=stage)
        failed = [g.error for g in gens if g.error is not None]
        raise_if_transient(stage, chunk.spec.key, failed, len(gens))
        out = []
        for name in group:
            mine = gens
            if len(group) > 1:
                tail = f"@{name}"
                mine = [
                    g.model_copy(update={"id": g.id.removesuffix(tail)})
                    for g in gens
                    if g.id.endswith(tail)
                ]
            rows = [
                s.model_copy(update={"id": stable_id(s.id, name), "generator": name})
                for s in await agrade_samples(problems, mine, sampling_of(name))
            ]
            out.append((name, rows, [g.error for g in mine if g.error is not None]))
        return out

    jobs = [one(group) for group in engine_groups(chunk.rt, cfg.models)]
    if cfg.engine_in_process:  # one engine at a time in this process
        done = [x for job in jobs for x in await job]
    else:  # every model finishes (its calls cached) before a failure fails the chunk
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        done = [x for o in outcomes if not isinstance(o, BaseException) for x in o]
    rows: list[Sample] = []
    errors: list[ErrorInfo] = []
    counts: Counter[str] = Counter()
    for name, got, failed in done:
        rows += got
        errors += failed
        counts.update(f"critique_sample.{name}.{s.status}" for s in got)
    return StageResult(
        rows=dict(split_rows("samples", rows, cfg.rows_per_chunk)),
        counts=counts,
        errors=errors,
        attempted=len(problems) * len(cfg.models),
    )


def engine_groups(rt: Runtime, names: Sequence[str]) -> list[list[str]]:
    """The models in groups that generate together: models on vLLM (here or on the
    vllm pool) with the same engine (``identity()``) and deployment share one call, so
    the engine loads once for all of them (the same model at two temperatures); the
    first model's backend settings (chunk size, runs) serve the group. Every other model
    is a group of its own. Order kept.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        backend = rt.backends.get(model_role(name))
        key = f"own:{name}"
        if backend is not None and backend.kind != "endpoint" and backend.engine is not None:
            key = fingerprint([backend.kind, backend.deployment, backend.engine.identity()])
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# -- merge, filter, pick ----------------------------------------------------------------


class MergeConfig(BaseModel):
    """The merge, the consistency filter and the drawing of critique examples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] = Field(min_length=1)
    keep: KeepRule = "any_mixed"
    per_problem: int = Field(4, ge=1, le=1024, description="Critique examples per problem.")
    balance: bool = Field(True, description="As many right as wrong where possible.")
    seed: int = 0
    data_source: str = Field("{source}_critique")
    problems_per_chunk: int = Field(ge=1, description="The load stage's rows per chunk.")
    rows_per_chunk: int = Field(2000, ge=1)


def graded(s: Sample) -> bool:
    """Whether a sample was graded against a reference answer (a sample of a problem
    without one, or one that errored, is not, whatever it printed).
    """
    return s.reference is not None and s.status in GRADED


def tally(samples: Sequence[Sample]) -> ModelTally:
    """One model's samples of one problem, counted and flagged."""
    right = sum(graded(s) and s.status == "correct" for s in samples)
    wrong = sum(graded(s) and s.status != "correct" for s in samples)
    n_graded = right + wrong
    flag: ConsistencyFlag = (
        "ungraded"
        if not n_graded
        else "all_right"
        if not wrong
        else "all_wrong"
        if not right
        else "mixed"
    )
    return ModelTally(
        right=right,
        wrong=wrong,
        ungraded=len(samples) - n_graded,
        pass_rate=round(right / n_graded, 6) if n_graded else None,
        flag=flag,
    )


def keep_decision(tallies: Mapping[str, ModelTally], rule: KeepRule) -> tuple[bool, str]:
    """Whether the consistency filter keeps a problem, and why (see :data:`KEEP_RULES`).
    Models without a graded sample take no part.
    """
    graded = [t for t in tallies.values() if t.flag != "ungraded"]
    if not graded:
        return False, "ungraded"
    if rule == "all":
        return True, "graded"
    if any(t.flag == "mixed" for t in graded):
        return True, "mixed"
    if all(t.flag == "all_right" for t in graded):
        return False, "all_right"
    if all(t.flag == "all_wrong" for t in graded):
        return False, "all_wrong"
    if rule == "disagree":
        return True, "models_disagree"
    return False, "models_consistent"


def _round_robin(groups: Sequence[list[Sample]]) -> list[Sample]:
    out: list[Sample] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def pick_examples(
    samples: Sequence[Sample], k: int, *, balance: bool, rng: random.Random
) -> list[Sample]:
    """Up to ``k`` graded samples drawn from every model in turn (order shuffled by
    ``rng``). Balanced: half right and half wrong, an odd ``k``'s extra place on a side
    drawn by ``rng`` (a side short of samples leaves its places to the other); else
    ``k`` at random.
    """
    pool = [s for s in samples if graded(s)]

    def spread(rows: Sequence[Sample]) -> list[Sample]:
        by_model: dict[str, list[Sample]] = defaultdict(list)
        for s in rows:
            by_model[s.generator or s.model].append(s)
        names = sorted(by_model)
        rng.shuffle(names)
        for name in names:
            rng.shuffle(by_model[name])
        return _round_robin([by_model[n] for n in names])

    if not balance:
        return spread(pool)[:k]
    right = spread([s for s in pool if s.status == "correct"])
    wrong = spread([s for s in pool if s.status != "correct"])
    half = k // 2 + (k % 2 if rng.random() < 0.5 else 0)  # an odd K's extra: either side
    n_wrong = min(len(wrong), k - min(len(right), k - half))
    n_right = min(len(right), k - n_wrong)
    return right[:n_right] + wrong[:n_wrong]


def source_slug(source: str | None) -> str:
    """A problem's source as verl's data_source likes it (it picks the reward function
    by it): lower case, ``[a-z0-9_]``, at most 64 characters.

    >>> source_slug("tests/data/GSM8K test.jsonl")
    'tests_data_gsm8k_test_jsonl'
    """
    slug = re.sub(r"[^a-z0-9]+", "_", (source or "").lower()).strip("_")[-64:].strip("_")
    return slug or "mathmill"


def critique_example(
    problem: Problem, sample: Sample, position: int, data_source: str
) -> CritiqueExample:
    """The critique example of one graded sample: the filled-in prompt, the grader's
    verdict as the target.
    """
    prompt = load_prompt("critique_prompt")
    target: CritiqueTarget = "right" if sample.status == "correct" else "wrong"
    return CritiqueExample(
        id=stable_id(sample.id, "critique"),
        problem_id=problem.id,
        position=position,
        question=problem.statement,
        solution=sample.text,
        ground_truth=problem.answer,
        final_answer=sample.final_answer,
        target=target,
        model=sample.generator or sample.model,
        served_model=sample.model,
        sample_id=sample.id,
        sample_index=sample.index,
        source=problem.source,
        data_source=data_source.format(source=source_slug(problem.source)),
        prompt=prompt.render(question=problem.statement, solution=sample.text),
        prompt_ref=prompt.ref,
    )


@stage(
    "merge",
    params=MergeConfig,
    prompts=("critique_prompt",),
    inputs={"samples": Sample, "problems": Problem},
    outputs={"merged": MergedProblem, "examples": CritiqueExample},
)
async def merge(chunk: Chunk, cfg: MergeConfig) -> StageResult:
    """Every model's samples per problem, in input order: tallies and flags per model,
    the consistency filter's decision, and for a kept problem up to ``per_problem``
    critique examples (seeded per problem: the same run, the same draw).
    """
    samples: list[Sample] = chunk.rows("samples")
    problems: list[Problem] = chunk.rows("problems")
    by_problem: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_problem[s.problem_id].append(s)
    merged: list[MergedProblem] = []
    examples: list[CritiqueExample] = []
    counts: Counter[str] = Counter()
    first = chunk.index * cfg.problems_per_chunk
    for offset, p in enumerate(problems):
        mine = by_problem.get(p.id, [])
        per_model = {m: [s for s in mine if (s.generator or s.model) == m] for m in cfg.models}
        tallies = {m: tally(rows) for m, rows in per_model.items()}
        kept, reason = keep_decision(tallies, cfg.keep)
        right = sum(t.right for t in tallies.values())
        n_graded = right + sum(t.wrong for t in tallies.values())
        chosen: list[Sample] = []
        if kept:
            rng = random.Random(f"{cfg.seed}:{p.id}")
            ordered = [s for m in cfg.models for s in sorted(per_model[m], key=_sample_order)]
            chosen = pick_examples(ordered, cfg.per_problem, balance=cfg.balance, rng=rng)
            examples += [critique_example(p, s, first + offset, cfg.data_source) for s in chosen]
        counts[f"merge.{'kept' if kept else 'dropped'}.{reason}"] += 1
        for m, t in tallies.items():
            counts[f"merge.flag.{m}.{t.flag}"] += 1
        merged.append(
            MergedProblem(
                id=p.id,
                position=first + offset,
                problem=p.statement,
                reference=p.answer,
                source=p.source,
                models=tallies,
                pass_rate=round(right / n_graded, 6) if n_graded else None,
                kept=kept,
                reason=reason,
                examples=len(chosen),
            )
        )
    counts.update(f"merge.target.{e.target}" for e in examples)
    return StageResult(
        rows=dict(split_rows("merged", merged, cfg.rows_per_chunk))
        | dict(split_rows("examples", examples, cfg.rows_per_chunk)),
        counts=counts,
        attempted=len(problems),
    )


def _sample_order(s: Sample) -> tuple[int, str]:
    return s.index, s.id


# -- teacher ----------------------------------------------------------------------------


class TeacherConfig(BaseModel):
    """The optional teacher: it explains each example; only explanations whose own
    conclusion agrees with the grader are kept.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    sees_reference: bool = Field(
        True, description="The teacher is told the question's correct final answer."
    )
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    rows_per_chunk: int = Field(2000, ge=1)


def parse_conclusion(text: str) -> CritiqueTarget | None:
    """The last ``Conclusion: right|wrong`` of a critique; None without one."""
    found = _CONCLUSION.findall(text)
    if not found:
        return None
    value = found[-1].lower()
    return "right" if value == "right" else "wrong"


def _teacher_request(e: CritiqueExample, cfg: TeacherConfig) -> GenRequest:
    text = e.prompt
    if cfg.sees_reference and e.ground_truth is not None:
        text = load_prompt("critique_teacher").render(prompt=e.prompt, ground_truth=e.ground_truth)
    return GenRequest(id=e.id, messages=[{"role": "user", "content": text}], sampling=cfg.sampling)


@stage(
    "teacher",
    params=TeacherConfig,
    roles=("teacher",),
    prompts=("critique_prompt", "critique_teacher"),
    inputs={"examples": CritiqueExample},
    outputs={"critiques": CritiqueExample},
)
async def teacher(chunk: Chunk, cfg: TeacherConfig) -> StageResult:
    """Each example explained by the teacher (when enabled): the critique is kept when
    its conclusion agrees with the grader's target; the teacher's conclusion is kept
    either way. Off: the examples pass through.
    """
    rows: list[CritiqueExample] = chunk.rows("examples")
    counts: Counter[str] = Counter()
    if not cfg.enabled or not rows:
        return StageResult(rows=dict(split_rows("critiques", rows, cfg.rows_per_chunk)))
    requests = [_teacher_request(e, cfg) for e in rows]
    gens = await generate(chunk.rt, "teacher", requests, stage="teacher")
    failed = [g.error for g in gens if g.error is not None]
    raise_if_transient("teacher", chunk.spec.key, failed, len(gens))
    name = role_model(chunk.rt, "teacher")
    out: list[CritiqueExample] = []
    for e, g in zip(rows, gens, strict=True):
        text = g.choices[0].text if g.error is None and g.choices else ""
        said = parse_conclusion(text)
        agrees = said is not None and said == e.target
        outcome = (
            "error"
            if g.error
            else "agrees"
            if agrees
            else "no_conclusion"
            if not said
            else "disagrees"
        )
        counts[f"teacher.{outcome}"] += 1
        update: dict[str, Any] = {"teacher_conclusion": said, "teacher_model": g.model or name}
        if agrees:
            update["critique"] = text.strip()
        out.append(e.model_copy(update=update))
    return StageResult(
        rows=dict(split_rows("critiques", out, cfg.rows_per_chunk)),
        counts=counts,
        errors=failed,
        attempted=len(rows),
    )


# -- export -----------------------------------------------------------------------------


def verl_row(e: CritiqueExample, index: int, split: str = "train") -> dict[str, Any]:
    """One example in verl's RL parquet layout: ``prompt`` as a role list,
    ``reward_model`` ``{ground_truth: right|wrong, style: rule}``, ``ability``,
    ``data_source``, ``extra_info`` (the original solution, the question's ground truth,
    the model and sample).
    """
    return {
        "data_source": e.data_source,
        "prompt": [{"role": "user", "content": e.prompt}],
        "ability": "critique",
        "reward_model": {"ground_truth": e.target, "style": "rule"},
        "extra_info": {
            "index": index,
            "split": split,
            "question": e.question,
            "original_solution": e.solution,
            "question_ground_truth": e.ground_truth or "",
            "final_answer": e.final_answer or "",
            "model": e.model,
            "served_model": e.served_model,
            "sample_index": e.sample_index,
            "problem_id": e.problem_id,
            "sample_id": e.sample_id,
        },
    }


def distribution(rows: Sequence[CritiqueExample]) -> dict[str, Any]:
    """The right/wrong balance of the examples: overall, per model, per source."""

    def split(group: Sequence[CritiqueExample]) -> dict[str, Any]:
        right = sum(e.target == "right" for e in group)
        return {
            "examples": len(group),
            "right": right,
            "wrong": len(group) - right,
            "right_ratio": round(right / len(group), 4) if group else None,
        }

    per_model: dict[str, list[CritiqueExample]] = defaultdict(list)
    per_source: dict[str, list[CritiqueExample]] = defaultdict(list)
    for e in rows:
        per_model[e.model].append(e)
        per_source[e.data_source].append(e)
    out: dict[str, Any] = {
        "overall": split(rows),
        "per_model": {k: split(v) for k, v in sorted(per_model.items())},
        "per_source": {k: split(v) for k, v in sorted(per_source.items())},
    }
    with_teacher = [e for e in rows if e.teacher_model is not None]
    if with_teacher:
        out["teacher"] = {
            "examples": len(with_teacher),
            "kept": sum(e.critique is not None for e in with_teacher),
        }
    return out
