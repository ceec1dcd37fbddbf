"""The Prefect tasks of the synthesize pipeline: one per stage, each over one chunk.

Each task is a thin wrapper: it reads its input chunks, calls the stage's plain
function (:mod:`mathmill.tasks.generate`, :mod:`mathmill.tasks.verify`) and hands the
rows to :func:`~mathmill.tasks.runtime.run_chunk`, which makes the chunk idempotent.
``cache_key_fn`` adds Prefect's own caching on the same key. ``task.fn`` runs a stage
without Prefect (see ``bench/synthesize.py``).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from mathmill.records import Attempt, Problem, Topic
from mathmill.tasks.generate import (
    CotConfig,
    ProblemsConfig,
    TopicsConfig,
    dedup_problems,
    generate_cots,
    generate_problems,
    generate_topics,
)
from mathmill.tasks.runtime import (
    ChunkSpec,
    StageOutput,
    chunk_cache_key,
    current_runtime,
    raise_if_transient,
    read_input,
    run_chunk,
    split_rows,
)
from mathmill.tasks.verify import VerifyConfig, verify_chunk

__all__ = ["cots_task", "dedup_task", "problems_task", "topics_task", "verify_task"]


@task(
    name="topics",
    task_run_name="topics",
    cache_key_fn=chunk_cache_key,
    persist_result=True,
)
async def topics_task(spec: ChunkSpec, cfg: TopicsConfig) -> StageOutput:
    """Generate the run's unique topics."""
    rt = current_runtime()

    async def compute() -> Any:
        got = await generate_topics(rt, cfg)
        raise_if_transient(spec.stage, spec.key, got.errors, got.counts["topics.calls"])
        return {"topics": got.rows, "dropped": got.dropped}, got.counts

    return await run_chunk(spec, compute)


@task(
    name="problems",
    task_run_name="problems-{spec.index}",
    cache_key_fn=chunk_cache_key,
    persist_result=True,
)
async def problems_task(spec: ChunkSpec, cfg: ProblemsConfig) -> StageOutput:
    """Write problems for a slice of the topics."""
    rt = current_runtime()

    async def compute() -> Any:
        start, end = spec.config["slice"]
        topics: list[Topic] = read_input(spec.inputs[0], Topic)[start:end]
        got = await generate_problems(rt, cfg, topics)
        raise_if_transient(spec.stage, spec.key, got.errors, len(topics) * cfg.per_topic)
        return {"problems_raw": got.rows, "dropped": got.dropped}, got.counts

    return await run_chunk(spec, compute)


@task(
    name="dedup",
    task_run_name="dedup",
    cache_key_fn=chunk_cache_key,
    persist_result=True,
)
async def dedup_task(spec: ChunkSpec, chunk_size: int, limit: int | None) -> StageOutput:
    """Drop duplicate problems across chunks, apply ``limit``, rechunk for solving."""

    async def compute() -> Any:
        problems = [p for ref in spec.inputs for p in read_input(ref, Problem)]
        got = dedup_problems(problems, limit)
        kept: list[Problem] = got.rows  # type: ignore[assignment]
        return {"dropped": got.dropped, **split_rows("problems", kept, chunk_size)}, got.counts

    return await run_chunk(spec, compute)


@task(
    name="cots",
    task_run_name="cots-{spec.index}",
    cache_key_fn=chunk_cache_key,
    persist_result=True,
)
async def cots_task(spec: ChunkSpec, cfg: CotConfig) -> StageOutput:
    """Long and short chains of thought for a chunk of problems."""
    rt = current_runtime()

    async def compute() -> Any:
        problems: list[Problem] = read_input(spec.inputs[0], Problem)
        got = await generate_cots(rt, cfg, problems)
        raise_if_transient(spec.stage, spec.key, got.errors, len(got.rows))
        return {"cots": got.rows}, got.counts

    return await run_chunk(spec, compute)


@task(
    name="verify",
    task_run_name="verify-{spec.index}",
    cache_key_fn=chunk_cache_key,
    persist_result=True,
)
async def verify_task(spec: ChunkSpec, cfg: VerifyConfig) -> StageOutput:
    """Verify a chunk of chains of thought by code, with rewrite rounds."""
    rt = current_runtime()

    async def compute() -> Any:
        problems: list[Problem] = read_input(spec.inputs[0], Problem)
        cots: list[Attempt] = read_input(spec.inputs[1], Attempt)
        got = await verify_chunk(rt, cfg, problems, cots)
        raise_if_transient(spec.stage, spec.key, got.errors, len(cots))
        got.counts["verify.cots"] = len(cots)
        outputs = {
            "attempts": got.attempts,
            "verified": got.verified,
            "unverified": got.unverified,
        }
        return outputs, got.counts

    return await run_chunk(spec, compute)
