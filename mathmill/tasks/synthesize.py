"""The stages of the synthesize pipeline, declared for the pipeline kit: topics →
problems → dedup → chains of thought → code verification and its cross-checks.

Each is a :func:`~mathmill.pipeline.stage.stage` over one chunk, calling the stage's
plain function (:mod:`mathmill.tasks.writing`, :mod:`mathmill.tasks.crosscheck`); the kit
derives the Prefect task, cache key and resume from the declaration.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mathmill.pipeline.chunks import split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.records import Attempt, Problem, SolutionRow, Topic
from mathmill.tasks.crosscheck import verify_chunk
from mathmill.tasks.verify import VerifyConfig
from mathmill.tasks.writing import (
    CotConfig,
    ProblemsConfig,
    TopicsConfig,
    dedup_problems,
    generate_cots,
    generate_problems,
    generate_topics,
)

__all__ = ["DedupConfig", "cots", "dedup", "problems", "topics", "verify"]


class DedupConfig(BaseModel):
    """Config of the dedup stage: how many problems are kept, per output chunk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: int = Field(ge=1, description="Problems per output chunk.")
    limit: int | None = Field(None, ge=1, description="Keep at most this many problems.")


@stage(
    "topics",
    params=TopicsConfig,
    kind="source",
    roles=("generator",),
    prompts=("synth_topics",),
    outputs={"topics": Topic},
)
async def topics(chunk: Chunk, cfg: TopicsConfig) -> StageResult:
    """Generate the run's unique topics."""
    got = await generate_topics(chunk.rt, cfg)
    return StageResult(
        rows={"topics": got.rows},
        dropped=got.dropped,
        counts=got.counts,
        errors=got.errors,
        attempted=got.counts["topics.calls"],
    )


@stage(
    "problems",
    params=ProblemsConfig,
    roles=("generator",),
    prompts=("synth_problem",),
    inputs={"topics": Topic},
    outputs={"problems_raw": Problem},
)
async def problems(chunk: Chunk, cfg: ProblemsConfig) -> StageResult:
    """Write problems for a slice of the topics."""
    rows: list[Topic] = chunk.rows("topics")
    got = await generate_problems(chunk.rt, cfg, rows)
    return StageResult(
        rows={"problems_raw": got.rows},
        dropped=got.dropped,
        counts=got.counts,
        errors=got.errors,
        attempted=len(rows) * cfg.per_topic,
    )


@stage(
    "dedup",
    params=DedupConfig,
    kind="whole",
    inputs={"problems_raw": Problem},
    outputs={"problems": Problem},
)
async def dedup(chunk: Chunk, cfg: DedupConfig) -> StageResult:
    """Drop duplicate problems across chunks, apply ``limit``, rechunk for solving."""
    got = dedup_problems(chunk.rows("problems_raw"), cfg.limit)
    kept: list[Problem] = got.rows  # type: ignore[assignment]
    return StageResult(
        rows=dict(split_rows("problems", kept, cfg.chunk_size)),
        dropped=got.dropped,
        counts=got.counts,
    )


@stage(
    "cots",
    params=CotConfig,
    roles=("reasoner",),
    prompts=("synth_long_cot", "synth_short_cot"),
    inputs={"problems": Problem},
    outputs={"cots": Attempt},
)
async def cots(chunk: Chunk, cfg: CotConfig) -> StageResult:
    """Long and short chains of thought for a chunk of problems."""
    got = await generate_cots(chunk.rt, cfg, chunk.rows("problems"))
    return StageResult(
        rows={"cots": got.rows}, counts=got.counts, errors=got.errors, attempted=len(got.rows)
    )


@stage(
    "verify",
    params=VerifyConfig,
    roles=("coder", "critic", "rewriter"),
    prompts=(
        "synth_code",
        "synth_critique",
        "synth_regen_code",
        "synth_rewrite",
        "curate_solve",  # the blind program and its repairs (tasks/solve.py)
        "curate_repair",
    ),
    inputs={"problems": Problem, "cots": Attempt},
    outputs={"attempts": Attempt, "verified": SolutionRow, "unverified": SolutionRow},
)
async def verify(chunk: Chunk, cfg: VerifyConfig) -> StageResult:
    """Verify a chunk of chains of thought by code, with rewrite rounds; cross-check
    the verified ones (a blind program per problem, the majority).
    """
    cot_rows: list[Attempt] = chunk.rows("cots")
    got = await verify_chunk(chunk.rt, cfg, chunk.rows("problems"), cot_rows)
    got.counts["verify.cots"] = len(cot_rows)
    return StageResult(
        rows={"attempts": got.attempts, "verified": got.verified, "unverified": got.unverified},
        counts=got.counts,
        errors=got.errors,
        attempted=len(cot_rows),
    )
