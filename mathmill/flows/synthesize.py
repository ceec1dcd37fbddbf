"""The ``synthesize`` flow: topics → problems → long and short chains of thought →
code verification (code, critique, regenerated code, sandbox run, answer check, leak
check) → feedback-and-rewrite rounds → a verified dataset and its side outputs.

Every stage is a Prefect task over a chunk of rows, cached on the input chunks'
content hashes, the stage config, the prompt hashes and the stage's code; finished
LLM calls are kept in a call cache. Re-running the same command resumes.

>>> cfg = SynthesizeConfig(out="/tmp/run", topics=2, problems_per_topic=1)
>>> plan(cfg).problems
2
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import MathmillError
from mathmill.flows.options import ModelRole, SandboxOptions
from mathmill.flows.resources import open_runtime
from mathmill.records import Attempt, Problem, SamplingParams, Topic
from mathmill.storage import ChunkRef, StorageConfig
from mathmill.tasks.export import (
    count_rows,
    dump_json,
    export_jsonl,
    remove_stale_chunks,
    report_markdown,
)
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
    Runtime,
    StageOutput,
    chunk_cache_key,
    code_version,
    current_runtime,
    prompt_hashes,
    raise_if_transient,
    run_chunk,
    use_runtime,
)
from mathmill.tasks.verify import VerifyConfig, verify_chunk

__all__ = ["Models", "SynthesizeConfig", "SynthesizeResult", "plan", "synthesize"]

DEFAULT_DOMAINS = ["algebra", "number theory", "combinatorics", "geometry", "probability"]
ROLES = ("generator", "reasoner", "coder", "critic", "rewriter")
ROLE_DEFAULTS: dict[str, ModelRole] = {
    "generator": ModelRole(temperature=1.0, max_tokens=1024),
    "reasoner": ModelRole(temperature=0.6, max_tokens=4096),
    "coder": ModelRole(temperature=0.2, max_tokens=1536),
    "critic": ModelRole(temperature=0.0, max_tokens=1024),
    "rewriter": ModelRole(temperature=0.6, max_tokens=4096),
}
OUTPUT_DATASETS = (
    "topics",
    "problems_raw",
    "problems",
    "cots",
    "attempts",
    "verified",
    "unverified",
    "dropped",
)


class Models(BaseModel):
    """The model of each role. ``default`` fills what a role leaves unset; with no
    base URL anywhere, every role uses the embedded local model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: ModelRole = Field(default_factory=ModelRole, description="Fallback for roles.")
    generator: ModelRole = Field(default_factory=ModelRole, description="Topics and problems.")
    reasoner: ModelRole = Field(default_factory=ModelRole, description="Chains of thought.")
    coder: ModelRole = Field(default_factory=ModelRole, description="CoT → Python code.")
    critic: ModelRole = Field(default_factory=ModelRole, description="Reviews the code.")
    rewriter: ModelRole = Field(default_factory=ModelRole, description="Revises failed CoTs.")

    def merged(self) -> dict[str, ModelRole]:
        """Each role over the default over the role's built-in sampling defaults."""
        return {
            name: getattr(self, name).over(self.default).over(ROLE_DEFAULTS[name]) for name in ROLES
        }


class SynthesizeConfig(BaseModel):
    """Parameters of the synthesize flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(
        "runs/synthesize",
        description="Run directory: local path or s3://bucket/prefix. Re-running with the "
        "same directory resumes.",
    )
    storage_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for s3:// run directories (MinIO, moto)."
    )
    topics: int = Field(10, ge=1, le=100_000, description="Unique topics to generate.")
    problems_per_topic: int = Field(2, ge=1, le=100, description="Problems per topic.")
    domains: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DOMAINS),
        min_length=1,
        max_length=100,
        description="Domains the topics cover, in turn.",
    )
    short_cots: int = Field(4, ge=0, le=64, description="Short CoTs per problem.")
    short_cot_max_tokens: int = Field(1024, ge=16, le=131072)
    rounds: int = Field(2, ge=0, le=10, description="Feedback-rewrite rounds per failed CoT.")
    regenerate_code: bool = Field(True, description="Regenerate the code from its critique.")
    leak_check: bool = Field(True, description="Reject code that hard-codes the answer.")
    chunk_size: int = Field(50, ge=1, le=10_000, description="Problems per chunk (task).")
    concurrency: int = Field(64, ge=1, le=4096, description="Rows in flight per chunk.")
    chunk_concurrency: int = Field(4, ge=1, le=256, description="Chunks in flight at once.")
    limit: int | None = Field(None, ge=1, description="At most this many problems are solved.")
    seed: int = Field(0, ge=0, description="Base seed; each sample gets its own.")
    dry_run: bool = Field(False, description="Validate and print the plan; call nothing.")
    models: Models = Field(default_factory=Models)
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions)


class Plan(BaseModel):
    """What a run will do, before it does it."""

    topics: int
    problems: int
    cots: int
    chunks: int
    max_llm_calls: int
    roles: dict[str, str]


class SynthesizeResult(BaseModel):
    """Where a run's outputs are, and its counts."""

    out: str
    plan: Plan
    dry_run: bool = False
    verified: int = 0
    unverified: int = 0
    counts: dict[str, int] = Field(default_factory=dict)
    usage: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="LLM calls, cached calls, tokens, cost by stage."
    )
    outputs: dict[str, str] = Field(default_factory=dict)
    wall_s: float = 0.0


def plan(cfg: SynthesizeConfig) -> Plan:
    """The run's shape and an upper bound on its LLM calls (no I/O)."""
    problems = cfg.topics * cfg.problems_per_topic
    if cfg.limit is not None:
        problems = min(problems, cfg.limit)
    cots = problems * (1 + cfg.short_cots)
    per_round = 3 if cfg.regenerate_code else 2
    calls = -(-cfg.topics // 10) * 2 + problems + cots * (per_round + cfg.rounds * (1 + per_round))
    roles = {
        name: f"{role.base_url or 'embedded'} {role.model or ''}".strip()
        for name, role in cfg.models.merged().items()
    }
    return Plan(
        topics=cfg.topics,
        problems=problems,
        cots=cots,
        chunks=-(-problems // cfg.chunk_size),
        max_llm_calls=calls,
        roles=roles,
    )


def _sampling(role: ModelRole, seed: int, max_tokens: int | None = None) -> SamplingParams:
    tokens = role.max_tokens if max_tokens is None else min(max_tokens, role.max_tokens or 0)
    return SamplingParams(temperature=role.temperature, max_tokens=tokens, seed=seed)


class _Stages(BaseModel):
    """The typed config of every stage, derived from the flow config."""

    topics: TopicsConfig
    problems: ProblemsConfig
    cots: CotConfig
    verify: VerifyConfig


def _stages(cfg: SynthesizeConfig) -> _Stages:
    roles = cfg.models.merged()
    reasoner = roles["reasoner"]
    return _Stages(
        topics=TopicsConfig(
            count=cfg.topics,
            domains=cfg.domains,
            sampling=_sampling(roles["generator"], cfg.seed),
        ),
        problems=ProblemsConfig(
            per_topic=cfg.problems_per_topic, sampling=_sampling(roles["generator"], cfg.seed)
        ),
        cots=CotConfig(
            short=cfg.short_cots,
            long_sampling=_sampling(reasoner, cfg.seed),
            short_sampling=_sampling(reasoner, cfg.seed + 1, cfg.short_cot_max_tokens),
        ),
        verify=VerifyConfig(
            rounds=cfg.rounds,
            regenerate=cfg.regenerate_code,
            leak_check=cfg.leak_check,
            limits=cfg.sandbox.limits,
            code_sampling=_sampling(roles["coder"], cfg.seed),
            critic_sampling=_sampling(roles["critic"], cfg.seed),
            rewrite_sampling=_sampling(roles["rewriter"], cfg.seed),
        ),
    )


_GENERATE = ("mathmill.tasks.generate", "mathmill.tasks.runtime", "mathmill.grading.extract")
_VERIFY = (
    "mathmill.tasks.verify",
    "mathmill.tasks.runtime",
    "mathmill.grading.coderun",
    "mathmill.grading.equivalence",
    "mathmill.grading.extract",
    "mathmill.grading.normalize",
    "mathmill.grading.leaks",
)


def _spec(
    rt: Runtime,
    stage: str,
    index: int,
    inputs: list[ChunkRef],
    config: BaseModel,
    roles: tuple[str, ...],
    prompts: tuple[str, ...],
    modules: tuple[str, ...],
    **extra: Any,
) -> ChunkSpec:
    endpoints = {r: rt.endpoints[r].identity for r in roles}
    return ChunkSpec(
        stage=stage,
        index=index,
        inputs=inputs,
        config={"stage": config.model_dump(mode="json"), "endpoints": endpoints, **extra},
        prompts=prompt_hashes(*prompts),
        code=code_version(*modules),
        store_url=rt.store.url,
    )


def _read(ref: ChunkRef, model: type[Any]) -> list[Any]:
    return current_runtime().store.dataset(ref.dataset).read_chunk(ref, model)


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
        topics: list[Topic] = _read(spec.inputs[0], Topic)[start:end]
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
        problems = [p for ref in spec.inputs for p in _read(ref, Problem)]
        got = dedup_problems(problems, limit)
        kept: list[Problem] = got.rows  # type: ignore[assignment]
        outputs: dict[str, Any] = {"dropped": got.dropped}
        for i in range(0, len(kept), chunk_size):
            outputs[f"problems/{i // chunk_size:05d}"] = kept[i : i + chunk_size]
        return outputs, got.counts

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
        problems: list[Problem] = _read(spec.inputs[0], Problem)
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
        problems: list[Problem] = _read(spec.inputs[0], Problem)
        cots: list[Attempt] = _read(spec.inputs[1], Attempt)
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


class IncompleteRun(MathmillError):
    """Some chunks failed; what finished is kept and a re-run resumes."""


class _Tracker:
    """Counts, per-stage timings and the progress artifact of a run."""

    def __init__(self, total_chunks: int) -> None:
        self.counts: Counter[str] = Counter()
        self.timings: dict[str, list[float]] = {}
        self.total = max(1, total_chunks)
        self.done = 0
        self.progress_id: Any = None

    async def run(self, stage: str, call: Awaitable[StageOutput]) -> StageOutput:
        start = time.perf_counter()
        out = await call
        n, reused, busy = self.timings.setdefault(stage, [0, 0, 0.0])
        self.timings[stage] = [n + 1, reused + int(out.reused), busy + time.perf_counter() - start]
        self.counts.update(out.counts)
        return out

    async def step(self, weight: float, message: str) -> None:
        self.done += 1
        if self.progress_id is not None:
            progress = min(100.0, 10.0 + 90.0 * self.done * weight)
            await aupdate_progress_artifact(self.progress_id, progress, description=message)

    def timing_table(self) -> dict[str, tuple[int, int, float]]:
        return {k: (int(v[0]), int(v[1]), v[2]) for k, v in self.timings.items()}


@flow(name="synthesize", validate_parameters=True, log_prints=False)
async def synthesize(config: SynthesizeConfig) -> SynthesizeResult:
    """Generate problems and solutions and keep those whose answer code reproduces."""
    logger = get_run_logger()
    cfg = config
    the_plan = plan(cfg)
    stages = _stages(cfg)  # validates every stage config before any call
    if cfg.dry_run:
        logger.info("dry run: %s", the_plan.model_dump_json())
        return SynthesizeResult(out=cfg.out, plan=the_plan, dry_run=True)
    started = time.perf_counter()
    storage = StorageConfig(url=cfg.out, endpoint_url=cfg.storage_endpoint_url)
    async with open_runtime(
        storage, cfg.models.merged(), sandbox=cfg.sandbox, row_concurrency=cfg.concurrency
    ) as rt:
        with use_runtime(rt):
            return await _run(cfg, stages, the_plan, rt, started)


async def _run(
    cfg: SynthesizeConfig, stages: _Stages, the_plan: Plan, rt: Runtime, started: float
) -> SynthesizeResult:
    logger = get_run_logger()
    tracker = _Tracker(the_plan.chunks)
    tracker.progress_id = await acreate_progress_artifact(
        0.0, key="synthesize-progress", description="synthesize: starting"
    )
    gen_prompts = ("synth_topics", "synth_problem")
    topics = await tracker.run(
        "topics",
        topics_task(
            _spec(rt, "topics", 0, [], stages.topics, ("generator",), gen_prompts[:1], _GENERATE),
            stages.topics,
        ),
    )
    topics_ref = topics.refs["topics"]
    per_chunk = max(1, cfg.chunk_size // cfg.problems_per_topic)
    slices = [
        (s, min(s + per_chunk, topics_ref.rows)) for s in range(0, topics_ref.rows, per_chunk)
    ]
    problem_outs = await asyncio.gather(
        *(
            tracker.run(
                "problems",
                problems_task(
                    _spec(
                        rt,
                        "problems",
                        i,
                        [topics_ref],
                        stages.problems,
                        ("generator",),
                        gen_prompts[1:],
                        _GENERATE,
                        slice=list(sl),
                    ),
                    stages.problems,
                ),
            )
            for i, sl in enumerate(slices)
        )
    )
    raw_refs = [o.refs["problems_raw"] for o in problem_outs if "problems_raw" in o.refs]
    dedup = await tracker.run(
        "dedup",
        dedup_task(
            _spec(
                rt,
                "dedup",
                0,
                raw_refs,
                stages.problems,
                (),
                (),
                _GENERATE,
                chunk_size=cfg.chunk_size,
                limit=cfg.limit,
            ),
            cfg.chunk_size,
            cfg.limit,
        ),
    )
    problem_refs = [ref for name, ref in sorted(dedup.refs.items()) if name.startswith("problems")]
    tracker.total = max(1, len(problem_refs))
    await aupdate_progress_artifact(
        tracker.progress_id, 10.0, description=f"{len(problem_refs)} chunks of problems"
    )
    logger.info(
        "%d unique problems in %d chunks", dedup.counts.get("dedup.kept", 0), len(problem_refs)
    )
    gate = asyncio.Semaphore(cfg.chunk_concurrency)

    async def solve(i: int, ref: ChunkRef) -> list[StageOutput]:
        async with gate:
            cot_prompts = ("synth_long_cot", "synth_short_cot")
            cots = await tracker.run(
                "cots",
                cots_task(
                    _spec(rt, "cots", i, [ref], stages.cots, ("reasoner",), cot_prompts, _GENERATE),
                    stages.cots,
                ),
            )
            verify_prompts = ("synth_code", "synth_critique", "synth_regen_code", "synth_rewrite")
            verified = await tracker.run(
                "verify",
                verify_task(
                    _spec(
                        rt,
                        "verify",
                        i,
                        [ref, cots.refs["cots"]],
                        stages.verify,
                        ("coder", "critic", "rewriter"),
                        verify_prompts,
                        _VERIFY,
                    ),
                    stages.verify,
                ),
            )
            await tracker.step(1 / tracker.total, f"chunk {i + 1} of {tracker.total} verified")
            return [cots, verified]

    results = await asyncio.gather(
        *(solve(i, ref) for i, ref in enumerate(problem_refs)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    outs = [topics, *problem_outs, dedup]
    for r in results:
        if not isinstance(r, BaseException):
            outs.extend(r)
    refs = [ref for o in outs for ref in o.refs.values()]
    return await _finish(cfg, the_plan, rt, tracker, refs, failures, started)


async def _finish(
    cfg: SynthesizeConfig,
    the_plan: Plan,
    rt: Runtime,
    tracker: _Tracker,
    refs: list[ChunkRef],
    failures: list[BaseException],
    started: float,
) -> SynthesizeResult:
    logger = get_run_logger()
    store = rt.store
    by_dataset: dict[str, list[ChunkRef]] = {}
    for ref in sorted(refs, key=lambda r: (r.dataset, r.key)):
        by_dataset.setdefault(ref.dataset, []).append(ref)
    outputs = {name: f"{store.url}/{name}/" for name in ("verified", "unverified", "dropped")}
    if not failures:
        for name in ("verified", "unverified", "dropped"):
            outputs[f"{name}.jsonl"] = export_jsonl(
                store, f"{name}.jsonl", by_dataset.get(name, [])
            )
        removed = remove_stale_chunks(store, OUTPUT_DATASETS, refs)
        if removed:
            logger.info("removed %d chunks left by an earlier run with other settings", removed)
    wall = time.perf_counter() - started
    outputs["report"] = f"{store.url}/report.md"
    status = "complete" if not failures else f"INCOMPLETE ({len(failures)} chunks failed)"
    report = report_markdown(
        f"synthesize run: {status}",
        tracker.counts,
        rt.pool.meter,
        tracker.timing_table(),
        outputs,
        wall,
    )
    store.write_bytes("report.md", report.encode())
    verified = sum(r.rows for r in by_dataset.get("verified", []))
    unverified = sum(r.rows for r in by_dataset.get("unverified", []))
    result = SynthesizeResult(
        out=store.url,
        plan=the_plan,
        verified=verified,
        unverified=unverified,
        counts=dict(tracker.counts),
        usage=rt.pool.meter.summary(),
        outputs=outputs,
        wall_s=wall,
    )
    manifest = {
        "status": status,
        "config": cfg.model_dump(mode="json"),
        "result": result.model_dump(mode="json"),
        "chunks": {k: [r.model_dump(mode="json") for r in v] for k, v in by_dataset.items()},
    }
    store.write_bytes("manifest.json", dump_json(manifest))
    await acreate_table_artifact(
        count_rows(tracker.counts),
        key="synthesize-counts",
        description=f"Rows by stage and outcome ({status})",
    )
    await acreate_markdown_artifact(report, key="synthesize-report", description="Run report")
    if failures:
        first = failures[0]
        raise IncompleteRun(
            f"{len(failures)} of {tracker.total} chunks did not finish (first: {first}); "
            f"{verified + unverified} rows are kept in {store.url}; re-run the same command "
            "to resume"
        ) from first
    await aupdate_progress_artifact(tracker.progress_id, 100.0, description="done")
    logger.info("%d verified and %d unverified rows in %s", verified, unverified, store.url)
    return result
