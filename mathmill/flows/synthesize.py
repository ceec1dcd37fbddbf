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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import MathmillError
from mathmill.flows.options import ModelRole, SandboxOptions, StorageFields
from mathmill.flows.progress import Tracker
from mathmill.flows.resources import open_runtime
from mathmill.records import SamplingParams
from mathmill.storage import ChunkRef
from mathmill.tasks.export import (
    count_rows,
    dump_json,
    export_jsonl,
    remove_stale_chunks,
    report_markdown,
    write_run_file,
)
from mathmill.tasks.generate import CotConfig, ProblemsConfig, TopicsConfig
from mathmill.tasks.runtime import (
    ChunkSpec,
    Runtime,
    StageOutput,
    code_version,
    prompt_hashes,
    use_runtime,
)
from mathmill.tasks.synthesize import (
    cots_task,
    dedup_task,
    problems_task,
    topics_task,
    verify_task,
)
from mathmill.tasks.verify import VerifyConfig

__all__ = [
    "IncompleteRun",
    "Models",
    "SynthesizeConfig",
    "SynthesizeResult",
    "plan",
    "run_synthesize",
    "synthesize",
]

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


class SynthesizeConfig(StorageFields):
    """Parameters of the synthesize flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(
        "runs/synthesize",
        description="Run directory: local path or s3://bucket/prefix (a path inside "
        "storage_block when that is set). Re-running with the same directory resumes.",
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
    stages: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per stage: chunks, chunks reused, busy seconds."
    )
    wall_s: float = 0.0


def plan(cfg: SynthesizeConfig) -> Plan:
    """The run's shape and an upper bound on its LLM calls (no I/O)."""
    problems = cfg.topics * cfg.problems_per_topic
    if cfg.limit is not None:
        problems = min(problems, cfg.limit)
    cots = problems * (1 + cfg.short_cots)
    per_round = 3 if cfg.regenerate_code else 2
    written = cfg.topics * cfg.problems_per_topic  # all are written; `limit` cuts after dedup
    calls = -(-cfg.topics // 10) * 2 + written + cots * (per_round + cfg.rounds * (1 + per_round))
    roles = {
        name: f"{_where(role)} {role.model or ''}".strip()
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


def _where(role: ModelRole) -> str:
    if role.block:
        return f"block {role.block}"
    return role.base_url or "embedded"


def _sampling(role: ModelRole, seed: int, max_tokens: int | None = None) -> SamplingParams:
    tokens = role.max_tokens
    if max_tokens is not None:
        tokens = min(max_tokens, tokens) if tokens else max_tokens
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


_STAGE_DEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # stage: (roles it calls, prompt templates, modules whose code it runs)
    "topics": (("generator",), ("synth_topics",), _GENERATE),
    "problems": (("generator",), ("synth_problem",), _GENERATE),
    "dedup": ((), (), _GENERATE),
    "cots": (("reasoner",), ("synth_long_cot", "synth_short_cot"), _GENERATE),
    "verify": (
        ("coder", "critic", "rewriter"),
        ("synth_code", "synth_critique", "synth_regen_code", "synth_rewrite"),
        _VERIFY,
    ),
}


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


class IncompleteRun(MathmillError):
    """Some chunks failed; what finished is kept and a re-run resumes."""


@flow(name="synthesize", validate_parameters=True, log_prints=False)
async def synthesize(config: SynthesizeConfig) -> SynthesizeResult:
    """Generate problems and solutions and keep those whose answer code reproduces."""
    return await run_synthesize(config, prefect=True)


async def run_synthesize(cfg: SynthesizeConfig, *, prefect: bool) -> SynthesizeResult:
    """The pipeline. With ``prefect=False`` the same stages run as plain functions
    (no task runs, no artifacts): what ``bench/synthesize.py`` compares against.
    """
    logger = _logger(prefect)
    the_plan = plan(cfg)
    stages = _stages(cfg)  # validates every stage config before any call
    if cfg.dry_run:
        logger.info("dry run: %s", the_plan.model_dump_json())
        return SynthesizeResult(out=cfg.out, plan=the_plan, dry_run=True)
    started = time.perf_counter()
    storage = await cfg.storage_config(cfg.out)
    call = _caller(prefect, cfg)
    async with open_runtime(
        storage, cfg.models.merged(), sandbox=cfg.sandbox, row_concurrency=cfg.concurrency
    ) as rt:
        with use_runtime(rt):
            tracker = Tracker(the_plan.chunks, artifacts=prefect)
            if prefect:
                tracker.progress_id = await acreate_progress_artifact(
                    0.0, key="synthesize-progress", description="synthesize: starting"
                )
            refs, failures = await _stages_run(cfg, stages, rt, tracker, call, logger)
            return await _finish(cfg, the_plan, rt, tracker, refs, failures, started, prefect)


def _logger(prefect: bool) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    return get_run_logger() if prefect else logging.getLogger("mathmill.synthesize")


Caller = Callable[..., Awaitable[StageOutput]]


def _caller(prefect: bool, cfg: SynthesizeConfig) -> Caller:
    """Calls a stage task as a Prefect task run (results in the config's result
    storage), or as its plain function.
    """

    def call(task_: Any, *args: Any) -> Awaitable[StageOutput]:
        if not prefect:
            plain: Awaitable[StageOutput] = task_.fn(*args)
            return plain
        run: Awaitable[StageOutput] = cfg.with_results(task_)(*args)
        return run

    return call


async def _stages_run(
    cfg: SynthesizeConfig,
    stages: _Stages,
    rt: Runtime,
    tracker: Tracker,
    call: Caller,
    logger: Any,
) -> tuple[list[ChunkRef], list[BaseException]]:
    """topics → problems (chunks) → dedup → per chunk: cots → verify."""

    def spec(stage: str, index: int, inputs: list[ChunkRef], config: BaseModel, **kw: Any) -> Any:
        roles, prompts, modules = _STAGE_DEPS[stage]
        return _spec(rt, stage, index, inputs, config, roles, prompts, modules, **kw)

    topics = await tracker.run(
        "topics", call(topics_task, spec("topics", 0, [], stages.topics), stages.topics)
    )
    topics_ref = topics.refs["topics"]
    per_chunk = max(1, cfg.chunk_size // cfg.problems_per_topic)
    slices = [
        [s, min(s + per_chunk, topics_ref.rows)] for s in range(0, topics_ref.rows, per_chunk)
    ]
    problem_outs = await asyncio.gather(
        *(
            tracker.run(
                "problems",
                call(
                    problems_task,
                    spec("problems", i, [topics_ref], stages.problems, slice=sl),
                    stages.problems,
                ),
            )
            for i, sl in enumerate(slices)
        )
    )
    raw = [o.refs["problems_raw"] for o in problem_outs if "problems_raw" in o.refs]
    dedup_spec = spec("dedup", 0, raw, stages.problems, chunk_size=cfg.chunk_size, limit=cfg.limit)
    dedup = await tracker.run("dedup", call(dedup_task, dedup_spec, cfg.chunk_size, cfg.limit))
    problem_refs = [ref for name, ref in sorted(dedup.refs.items()) if name.startswith("problems")]
    tracker.total = max(1, len(problem_refs))
    await tracker.step(f"{len(problem_refs)} chunks of problems", chunk_done=False)
    logger.info(
        "%d unique problems in %d chunks", dedup.counts.get("dedup.kept", 0), len(problem_refs)
    )
    gate = asyncio.Semaphore(cfg.chunk_concurrency)

    async def solve(i: int, ref: ChunkRef) -> list[StageOutput]:
        async with gate:
            cot_spec = spec("cots", i, [ref], stages.cots)
            cots = await tracker.run("cots", call(cots_task, cot_spec, stages.cots))
            verify_spec = spec("verify", i, [ref, cots.refs["cots"]], stages.verify)
            verified = await tracker.run("verify", call(verify_task, verify_spec, stages.verify))
            await tracker.step(f"chunk {i + 1} of {tracker.total} verified")
            return [cots, verified]

    results = await asyncio.gather(
        *(solve(i, ref) for i, ref in enumerate(problem_refs)), return_exceptions=True
    )
    outs = [topics, *problem_outs, dedup]
    failures: list[BaseException] = []
    for r in results:
        if isinstance(r, BaseException):
            failures.append(r)
        else:
            outs.extend(r)
    return [ref for o in outs for ref in o.refs.values()], failures


async def _finish(
    cfg: SynthesizeConfig,
    the_plan: Plan,
    rt: Runtime,
    tracker: Tracker,
    refs: list[ChunkRef],
    failures: list[BaseException],
    started: float,
    prefect: bool,
) -> SynthesizeResult:
    """Export the JSONL files, write the report and manifest, publish the artifacts."""
    logger = _logger(prefect)
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
    timings = tracker.timing_table()
    report = report_markdown(
        f"synthesize run: {status}", tracker.counts, rt.pool.meter, timings, outputs, wall
    )
    write_run_file(store, "report.md", report.encode(), failed=bool(failures))
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
        stages={
            name: {"chunks": n, "reused": r, "busy_s": round(t, 3)}
            for name, (n, r, t) in timings.items()
        },
        wall_s=wall,
    )
    manifest = {
        "status": status,
        "config": cfg.model_dump(mode="json"),
        "result": result.model_dump(mode="json"),
        "chunks": {k: [r.model_dump(mode="json") for r in v] for k, v in by_dataset.items()},
    }
    write_run_file(store, "manifest.json", dump_json(manifest), failed=bool(failures))
    if prefect:
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
    if prefect:
        await aupdate_progress_artifact(tracker.progress_id, 100.0, description="done")
    logger.info("%d verified and %d unverified rows in %s", verified, unverified, store.url)
    return result
