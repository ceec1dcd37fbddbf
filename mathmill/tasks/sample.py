"""The sample stage: N solutions per problem on the sampler role's backend (an
endpoint, vLLM here, or the ``generate`` deployment on the vllm pool), each graded
against the problem's reference answer, with the logprobs of its tokens.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from mathmill import sidecar
from mathmill.grading.reference import Graded, grade_solutions
from mathmill.pipeline.chunks import split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.prompts import load_prompt
from mathmill.records import (
    Generation,
    GenRequest,
    Problem,
    Sample,
    SamplingParams,
    stable_id,
)
from mathmill.tasks.generation import generate

__all__ = [
    "STATS_COLUMNS",
    "SampleConfig",
    "SampleFigures",
    "agrade_samples",
    "grade_samples",
    "sample",
    "sample_requests",
    "sample_stats",
]

SAMPLES_PER_CHUNK = 1000


class SampleConfig(BaseModel):
    """How each problem is sampled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampling: SamplingParams
    rows_per_chunk: int = Field(SAMPLES_PER_CHUNK, ge=1, description="Samples per output chunk.")


@stage(
    "sample",
    params=SampleConfig,
    roles=("sampler",),
    prompts=("sample_system",),
    inputs={"problems": Problem},
    outputs={"samples": Sample},
    warm=sidecar.GRADING,
)
async def sample(chunk: Chunk, cfg: SampleConfig) -> StageResult:
    """A chunk of problems' samples, generated as one batch on the sampler's backend
    (the endpoint: a call per problem; vLLM: one batch; the deployment: generation chunks
    shared out among flow runs), each graded against its reference answer.
    """
    problems: list[Problem] = chunk.rows("problems")
    gens = await generate(
        chunk.rt, "sampler", sample_requests(problems, cfg.sampling), stage="sample"
    )
    rows = await agrade_samples(problems, gens, cfg.sampling)
    counts: Counter[str] = Counter(f"sample.{r.status}" for r in rows)
    return StageResult(
        rows=dict(split_rows("samples", rows, cfg.rows_per_chunk)),
        counts=counts,
        errors=[g.error for g in gens if g.error is not None],
        attempted=len(gens),
    )


def sample_requests(problems: Sequence[Problem], sampling: SamplingParams) -> list[GenRequest]:
    """One chat request per problem: the ``sample_system`` prompt and the statement."""
    system = load_prompt("sample_system").text
    return [
        GenRequest(
            id=p.id,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": p.statement},
            ],
            sampling=sampling,
        )
        for p in problems
    ]


def grade_samples(
    problems: Sequence[Problem],
    gens: Sequence[Generation],
    sampling: SamplingParams,
    grades: Sequence[Graded] | None = None,
) -> list[Sample]:
    """One :class:`Sample` per generated solution (or one ``error`` row for a request
    that failed), graded against the problem's answer; ``sampling`` is what the
    requests asked for. ``grades``: the solutions' grades, already computed (in the
    order of :func:`_to_grade`; see :func:`agrade_samples`).
    """
    prompt = load_prompt("sample_system").ref
    by_id = {p.id: p for p in problems}
    todo = iter(grades if grades is not None else grade_solutions(_to_grade(by_id, gens)))
    rows: list[Sample] = []
    for g in gens:
        p = by_id[g.id]
        base: dict[str, Any] = {"problem_id": p.id, "problem": p.statement, "reference": p.answer}
        base |= {"model": g.model, "backend": g.backend, "prompt": prompt, "sampling": sampling}
        if g.error is not None:
            rows.append(
                Sample(
                    id=stable_id(p.id, "error"),
                    index=0,
                    text="",
                    status="error",
                    reason=g.error.message,
                    **base,
                )
            )
            continue
        for c in g.choices:
            status, answer, reason = next(todo)
            lps = c.logprobs
            total = sum(t.logprob for t in lps) if lps else None
            rows.append(
                Sample(
                    id=stable_id(p.id, str(c.index), g.model),
                    index=c.index,
                    text=c.text,
                    final_answer=answer,
                    status=status,
                    reason=reason,
                    finish_reason=c.finish_reason,
                    tokens=c.tokens,
                    logprob_sum=total,
                    logprob_mean=total / len(lps) if lps and total is not None else None,
                    logprobs=lps,
                    **base,
                )
            )
    return rows


def _to_grade(
    by_id: Mapping[str, Problem], gens: Sequence[Generation]
) -> list[tuple[str | None, str, str | None]]:
    """(reference, solution, problem) of every solution generated, in order."""
    return [
        (by_id[g.id].answer, c.text, by_id[g.id].statement)
        for g in gens
        if g.error is None
        for c in g.choices
    ]


async def agrade_samples(
    problems: Sequence[Problem], gens: Sequence[Generation], sampling: SamplingParams
) -> list[Sample]:
    """:func:`grade_samples`, the grading done in the helper process
    (:mod:`mathmill.sidecar`: math-verify and sympy on another core, the event loop
    free meanwhile); in-process where there is none.
    """
    items = _to_grade({p.id: p for p in problems}, gens)
    grades = await sidecar.call(grade_solutions, items, limit_s=_GRADE_S * len(items) + 60)
    return grade_samples(problems, gens, sampling, grades)


_GRADE_S = 5.0
"""The grader's time limit per answer (its default): a batch in the helper that takes
longer than this per answer plus a minute is given up there and graded here."""


class SampleFigures(Protocol):
    """What :func:`sample_stats` reads of a sample (a :class:`Sample` has it)."""

    @property
    def problem_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def tokens(self) -> int: ...
    @property
    def logprob_mean(self) -> float | None: ...


STATS_COLUMNS = ("problem_id", "status", "tokens", "logprob_mean")
"""The columns of the samples dataset :func:`sample_stats` reads."""


def sample_stats(
    rows: Sequence[SampleFigures], problems: int, dropped: int = 0
) -> list[dict[str, Any]]:
    """The run's statistics as table rows (metric, value); ``dropped``: input rows the
    load stage did not pass on (malformed, duplicate).
    """
    per: dict[str, list[SampleFigures]] = defaultdict(list)
    for r in rows:
        per[r.problem_id].append(r)
    graded = [r for r in rows if r.status in ("correct", "incorrect", "no_answer")]
    correct = sum(r.status == "correct" for r in rows)
    any_correct = sum(any(s.status == "correct" for s in v) for v in per.values())
    means = [r.logprob_mean for r in rows if r.logprob_mean is not None]

    def rate(n: int, d: int) -> float:
        return round(n / d, 4) if d else 0.0

    return [
        {"metric": "problems", "value": problems},
        {"metric": "dropped input rows", "value": dropped},
        {"metric": "samples", "value": sum(r.status != "error" for r in rows)},
        {"metric": "accuracy (correct / graded samples)", "value": rate(correct, len(graded))},
        {"metric": "pass@n (a correct sample)", "value": rate(any_correct, len(per))},
        {"metric": "no answer", "value": sum(r.status == "no_answer" for r in rows)},
        {"metric": "unvalidated", "value": sum(r.status == "unvalidated" for r in rows)},
        {"metric": "errors", "value": sum(r.status == "error" for r in rows)},
        {"metric": "mean tokens", "value": rate(sum(r.tokens for r in rows), len(rows))},
        {"metric": "mean logprob per token", "value": round(sum(means) / len(means), 4)}
        if means
        else {"metric": "mean logprob per token", "value": None},
    ]
