"""Generation stages: topics, problems (with dedup) and chains of thought.

Plain async functions over chunks of rows; :mod:`mathmill.flows.synthesize` wraps
them in cached Prefect tasks. Each returns its output rows, the rows it dropped
(with reasons) and counts by outcome; LLM failures are kept on the rows.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from mathmill.grading.extract import extract_answer
from mathmill.pipeline.chunks import Runtime, drop, map_rows
from mathmill.prompts import load_prompt
from mathmill.records import (
    Attempt,
    AttemptKind,
    Dropped,
    ErrorInfo,
    Generation,
    GenRequest,
    Problem,
    SamplingParams,
    Topic,
    normalize_statement,
)
from mathmill.tasks.generation import generate, role_model

__all__ = [
    "CotConfig",
    "ProblemsConfig",
    "StageRows",
    "TopicsConfig",
    "canonical_text",
    "dedup_problems",
    "generate_cots",
    "generate_problems",
    "generate_topics",
    "solution_leak",
]

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_SOLUTION_TEXT = re.compile(
    r"\\boxed|\b(?:the\s+)?answer\s*(?:is|:|=)|\bsolution\s*:|\bhint\s*:|\bstep\s*1\s*[:.)]",
    re.IGNORECASE,
)
MIN_PROBLEM_CHARS = 40


@dataclass
class StageRows:
    """What a generation stage produced: rows to pass on, dropped rows, counts."""

    rows: list[Problem] | list[Topic] | list[Attempt] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[ErrorInfo] = field(default_factory=list)


def canonical_text(text: str) -> str:
    """Lower-case alphanumeric words: the form two texts must share to be duplicates.

    >>> canonical_text("Find  X, if x+1 = 2.") == canonical_text("find x if x + 1 = 2")
    True
    """
    return _NON_ALNUM.sub(" ", normalize_statement(text).lower()).strip()


def solution_leak(statement: str) -> str | None:
    """Why a problem statement gives its answer or solution away, or None.

    >>> print(solution_leak("Find n. Answer: 12"))
    contains answer or solution text: 'Answer:'
    """
    if m := _SOLUTION_TEXT.search(statement):
        return f"contains answer or solution text: {m.group(0)!r}"
    return None


class TopicList(BaseModel):
    """The generator's reply to the topics prompt. The length bounds go into the JSON
    schema, so servers with grammar-constrained decoding (llama.cpp, vLLM) enforce them
    (only lower bounds: llama.cpp expands ``{m,n}`` repetitions into its grammar).
    """

    topics: list[Annotated[str, Field(min_length=8)]] = Field(
        min_length=1, description="Distinct topics."
    )


class ProblemDraft(BaseModel):
    """The generator's reply to the problem prompt."""

    # No max_length: llama.cpp expands {m,n} repetitions into its grammar.
    problem: str = Field(
        min_length=MIN_PROBLEM_CHARS, description="The problem statement, without its answer."
    )


class TopicsConfig(BaseModel):
    """How many topics, in which domains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=1, le=100_000)
    domains: list[str] = Field(min_length=1)
    per_call: int = Field(10, ge=1, le=100)
    max_rounds: int = Field(6, ge=1, le=100)
    sampling: SamplingParams


async def generate_topics(rt: Runtime, cfg: TopicsConfig) -> StageRows:
    """Ask the generator for topics in rounds until ``cfg.count`` unique ones (or
    ``max_rounds``); duplicates (same canonical text) are dropped with a reason.
    """
    client = rt.client("generator")
    prompt = load_prompt("synth_topics")
    out = StageRows()
    topics: list[Topic] = []
    seen: set[str] = set()
    for round_ in range(cfg.max_rounds):
        missing = cfg.count - len(topics)
        if missing <= 0 or any(e.transient for e in out.errors):
            break  # done, or the endpoint is failing: the chunk will be retried
        calls = -(-missing // cfg.per_call)
        avoid = "; ".join(t.text for t in topics[-50:]) or "(none yet)"
        slots = [
            (round_, i, cfg.domains[(len(topics) + i) % len(cfg.domains)], avoid)
            for i in range(calls)
        ]

        async def ask(
            slot: tuple[int, int, str, str],
        ) -> tuple[str, list[str], ErrorInfo | None]:
            r, i, domain, avoid = slot
            text = prompt.render(count=cfg.per_call, domain=domain, avoid=avoid)
            result = await client.structured(
                [{"role": "user", "content": text}],
                TopicList,
                stage="topics",
                sampling=cfg.sampling.model_copy(
                    update={"seed": _seed(cfg.sampling, r * 1000 + i)}
                ),
                raise_on_error=False,
                cache_salt=f"topics:{r}:{i}",
            )
            return domain, (result.value.topics if result.value else []), result.error

        for domain, texts, error in await map_rows(slots, ask, rt.row_concurrency):
            out.counts["topics.calls"] += 1
            if error is not None:
                out.counts[f"topics.failed_{error.kind}"] += 1
                out.errors.append(error)
                continue
            for text in texts:
                text = normalize_statement(text)
                if not text:
                    continue
                topic = Topic(
                    text=text, domain=domain, model=client.endpoint.model, prompt=prompt.ref
                )
                key = canonical_text(text)
                if key in seen or len(topics) >= cfg.count:
                    reason = "duplicate" if key in seen else "surplus"
                    out.dropped.append(drop("topics", reason, topic, topic.id))
                    out.counts[f"topics.{reason}"] += 1
                    continue
                seen.add(key)
                topics.append(topic)
    out.rows = topics
    out.counts["topics.kept"] = len(topics)
    if len(topics) < cfg.count:
        out.counts["topics.shortfall"] = cfg.count - len(topics)
    return out


class ProblemsConfig(BaseModel):
    """Problems per topic and how to sample them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_topic: int = Field(ge=1, le=100)
    sampling: SamplingParams


async def generate_problems(rt: Runtime, cfg: ProblemsConfig, topics: list[Topic]) -> StageRows:
    """``cfg.per_topic`` problems per topic; statements that give the answer away, are
    too short or fail to parse are dropped with the reason.
    """
    client = rt.client("generator")
    prompt = load_prompt("synth_problem")
    jobs = [(t, j) for t in topics for j in range(cfg.per_topic)]

    async def write(job: tuple[Topic, int]) -> Problem | Dropped | ErrorInfo:
        topic, j = job
        sampling = cfg.sampling.model_copy(update={"seed": _seed(cfg.sampling, j)})
        result = await client.structured(
            [
                {
                    "role": "user",
                    "content": prompt.render(topic=topic.text, domain=topic.domain or ""),
                }
            ],
            ProblemDraft,
            stage="problems",
            sampling=sampling,
            raise_on_error=False,
            cache_salt=f"problem:{topic.id}:{j}",
        )
        if result.value is None:
            assert result.error is not None
            return result.error.model_copy(
                update={"message": f"topic {topic.id}: {result.error.message}"}
            )
        problem = Problem(
            statement=normalize_statement(result.value.problem) or "?",
            topic=topic.text,
            domain=topic.domain,
            source="mathmill.synthesize",
            model=result.result.model or client.endpoint.model,
            prompt=prompt.ref,
            usage=result.result.usage,
            metadata={"topic_id": topic.id, "sample": j},
        )
        if len(problem.statement) < MIN_PROBLEM_CHARS:
            return drop(
                "problems", "too_short", problem, problem.id, f"{len(problem.statement)} chars"
            )
        if why := solution_leak(problem.statement):
            return drop("problems", "contains_solution", problem, problem.id, why)
        return problem

    out = StageRows()
    problems: list[Problem] = []
    for item in await map_rows(jobs, write, rt.row_concurrency):
        if isinstance(item, Problem):
            problems.append(item)
            out.counts["problems.generated"] += 1
        elif isinstance(item, Dropped):
            out.dropped.append(item)
            out.counts[f"problems.{item.reason}"] += 1
        else:
            out.errors.append(item)
            out.counts[f"problems.failed_{item.kind}"] += 1
    out.rows = problems
    return out


def dedup_problems(problems: list[Problem], limit: int | None) -> StageRows:
    """Keep the first problem of each canonical statement, then at most ``limit``."""
    out = StageRows()
    kept: list[Problem] = []
    first: dict[str, str] = {}
    for p in problems:
        key = canonical_text(p.statement)
        if key in first:
            out.dropped.append(drop("dedup", "duplicate", p, p.id, f"same as problem {first[key]}"))
            out.counts["dedup.duplicate"] += 1
        elif limit is not None and len(kept) >= limit:
            out.dropped.append(drop("dedup", "over_limit", p, p.id, f"limit {limit}"))
            out.counts["dedup.over_limit"] += 1
        else:
            first[key] = p.id
            kept.append(p)
    out.rows = kept
    out.counts["dedup.kept"] = len(kept)
    return out


class CotConfig(BaseModel):
    """One long chain of thought and ``short`` short ones per problem."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    short: int = Field(ge=0, le=64)
    long_sampling: SamplingParams
    short_sampling: SamplingParams


def _cot_request(
    problem: Problem, kind: AttemptKind, index: int, sampling: SamplingParams
) -> GenRequest:
    prompt = load_prompt("synth_long_cot" if kind == "long_cot" else "synth_short_cot")
    return GenRequest(
        id=f"{kind}:{problem.id}:{index}",  # also the call cache's salt
        messages=[{"role": "user", "content": prompt.render(problem=problem.statement)}],
        sampling=sampling.model_copy(update={"seed": _seed(sampling, index)}),
        metadata={"problem_id": problem.id, "kind": kind, "index": index},
    )


def _cot_attempt(request: GenRequest, gen: Generation, default_model: str) -> Attempt:
    kind: AttemptKind = request.metadata["kind"]  # type: ignore[assignment]
    prompt = load_prompt("synth_long_cot" if kind == "long_cot" else "synth_short_cot")
    choice = gen.choices[0] if gen.choices and gen.error is None else None
    text = choice.text if choice is not None else None
    answer = extract_answer(text, number_fallback=False) if text is not None else None
    metadata: dict[str, JsonValue] = {"cot_type": kind}
    if choice is not None:
        metadata["finish_reason"] = choice.finish_reason
    return Attempt(
        problem_id=str(request.metadata["problem_id"]),
        kind=kind,
        model=gen.model or default_model,
        sampling=request.sampling,
        prompt=prompt.ref,
        sample_index=int(request.metadata["index"]),  # type: ignore[arg-type]
        text=text,
        final_answer=answer.text if answer else None,
        usage=gen.usage,
        latency_ms=gen.latency_ms,
        error=gen.error,
        metadata=metadata,
    )


async def generate_cots(rt: Runtime, cfg: CotConfig, problems: list[Problem]) -> StageRows:
    """The long and short chains of thought of every problem, tagged by ``kind``, on
    the reasoner's backend (its endpoint, or vLLM: see
    :func:`mathmill.tasks.generation.generate`).
    """
    longs = [_cot_request(p, "long_cot", 0, cfg.long_sampling) for p in problems]
    shorts = [
        _cot_request(p, "short_cot", i, cfg.short_sampling)
        for p in problems
        for i in range(cfg.short)
    ]
    got_long, got_short = await asyncio.gather(
        generate(rt, "reasoner", longs, stage="cot.long"),
        generate(rt, "reasoner", shorts, stage="cot.short") if shorts else _none(),
    )
    by_id = {g.id: g for g in [*got_long, *got_short]}
    per_problem = 1 + cfg.short
    order = [
        request
        for i, long in enumerate(longs)
        for request in [long, *shorts[i * cfg.short : (i + 1) * cfg.short]]
    ]
    assert len(order) == per_problem * len(problems)
    model = role_model(rt, "reasoner")
    out = StageRows()
    attempts = [_cot_attempt(r, by_id[r.id], model) for r in order]
    for a in attempts:
        out.counts[f"cots.{a.kind}"] += 1
        if a.error is not None:
            out.errors.append(a.error)
            out.counts[f"cots.failed_{a.error.kind}"] += 1
    out.rows = attempts
    return out


async def _none() -> list[Generation]:
    return []


def _seed(sampling: SamplingParams, index: int) -> int | None:
    """A distinct, reproducible seed per sample (None stays None)."""
    return None if sampling.seed is None else sampling.seed + index
