"""The ``synthesize`` flow: topics → problems → long and short chains of thought →
code verification (code, critique, regenerated code, sandbox run, answer check, leak
check) → feedback-and-rewrite rounds → cross-checks of the verified ones (a program
written from the problem alone; optionally the majority answer) → a verified dataset
and its side outputs.

Every stage is a Prefect task over a chunk of rows, cached on the input chunks'
content hashes, the stage config, the prompt hashes and the stage's code; finished
LLM calls are kept in a call cache. Re-running the same command resumes.

>>> cfg = SynthesizeParams(out="/tmp/run", topics=2, problems_per_topic=1)
>>> plan(cfg).problems
2
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from prefect import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import IncompleteRun
from mathmill.flows.options import ModelRole, SandboxOptions, StorageFields
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.fanout import FanOutFields
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import SamplingParams
from mathmill.tasks import synthesize as stages
from mathmill.tasks.generation import GenBackend
from mathmill.tasks.synthesize import DedupConfig
from mathmill.tasks.verify import VerifyConfig
from mathmill.tasks.writing import CotConfig, ProblemsConfig, TopicsConfig

__all__ = [
    "PIPELINE",
    "IncompleteRun",
    "Models",
    "SynthesizeParams",
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


class SynthesizeParams(FanOutFields, BudgetFields, StorageFields):
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
    blind_check: bool = Field(
        True,
        description="Unverify a CoT whose answer differs from that of a program the coder "
        "writes from the problem alone (status disagreement); its repair rounds are `rounds`.",
    )
    majority: bool = Field(
        False,
        description="Unverify a CoT whose answer is not the majority answer among the "
        "problem's CoTs (status minority; a tie decides nothing).",
    )
    chunk_size: int = Field(50, ge=1, le=10_000, description="Problems per chunk (task).")
    concurrency: int = Field(64, ge=1, le=4096, description="Rows in flight per chunk.")
    chunk_concurrency: int = Field(4, ge=1, le=256, description="Chunks in flight at once.")
    limit: int | None = Field(None, ge=1, description="At most this many problems are solved.")
    seed: int = Field(0, ge=0, description="Base seed; each sample gets its own.")
    dry_run: bool = Field(False, description="Validate and print the plan; call nothing.")
    models: Models = Field(default_factory=Models)
    backends: dict[Literal["reasoner"], GenBackend] = Field(
        default_factory=dict,
        description="Roles whose calls run on vLLM instead of their endpoint: 'engine' "
        "(vLLM in this process) or 'deployment' (the generate deployment on the vllm "
        "pool), with the model to load. The chains of thought (reasoner) can.",
        examples=[{"reasoner": {"kind": "deployment", "engine": {"model": "/models/qwen"}}}],
    )
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions)


class Plan(BaseModel):
    """What a run will do, before it does it."""

    topics: int
    problems: int
    cots: int
    chunks: int
    max_llm_calls: int
    roles: dict[str, str]


class SynthesizeResult(RunResult):
    """Where a run's outputs are, and its counts."""

    plan: Plan
    verified: int = 0
    unverified: int = 0


def plan(cfg: SynthesizeParams) -> Plan:
    """The run's shape and an upper bound on its LLM calls (no I/O)."""
    problems = cfg.topics * cfg.problems_per_topic
    if cfg.limit is not None:
        problems = min(problems, cfg.limit)
    cots = problems * (1 + cfg.short_cots)
    per_round = 3 if cfg.regenerate_code else 2
    written = cfg.topics * cfg.problems_per_topic  # all are written; `limit` cuts after dedup
    calls = -(-cfg.topics // 10) * 2 + written + cots * (per_round + cfg.rounds * (1 + per_round))
    if cfg.blind_check:
        calls += problems * (1 + cfg.rounds)  # one blind program per problem, its repairs
    vllm = {str(name): backend for name, backend in cfg.backends.items()}
    roles = {
        name: _on_vllm(vllm[name]) if name in vllm else f"{_where(role)} {role.model or ''}".strip()
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


def _on_vllm(backend: GenBackend) -> str:
    model = backend.engine.model if backend.engine is not None else ""
    return f"vllm {backend.kind} {model}".strip()


def _where(role: ModelRole) -> str:
    if role.block:
        return f"block {role.block}"
    return role.base_url or "embedded"


def _sampling(role: ModelRole, seed: int, max_tokens: int | None = None) -> SamplingParams:
    tokens = role.max_tokens
    if max_tokens is not None:
        tokens = min(max_tokens, tokens) if tokens else max_tokens
    return SamplingParams(temperature=role.temperature, max_tokens=tokens, seed=seed)


def _roles(cfg: SynthesizeParams) -> dict[str, ModelRole]:
    return cfg.models.merged()


def _topics(cfg: SynthesizeParams) -> TopicsConfig:
    return TopicsConfig(
        count=cfg.topics,
        domains=cfg.domains,
        sampling=_sampling(_roles(cfg)["generator"], cfg.seed),
    )


def _problems(cfg: SynthesizeParams) -> ProblemsConfig:
    return ProblemsConfig(
        per_topic=cfg.problems_per_topic,
        sampling=_sampling(_roles(cfg)["generator"], cfg.seed),
    )


def _cots(cfg: SynthesizeParams) -> CotConfig:
    reasoner = _roles(cfg)["reasoner"]
    return CotConfig(
        short=cfg.short_cots,
        long_sampling=_sampling(reasoner, cfg.seed),
        short_sampling=_sampling(reasoner, cfg.seed + 1, cfg.short_cot_max_tokens),
    )


def _verify(cfg: SynthesizeParams) -> VerifyConfig:
    roles = _roles(cfg)
    return VerifyConfig(
        rounds=cfg.rounds,
        regenerate=cfg.regenerate_code,
        leak_check=cfg.leak_check,
        blind_check=cfg.blind_check,
        majority=cfg.majority,
        limits=cfg.sandbox.limits,
        code_sampling=_sampling(roles["coder"], cfg.seed),
        critic_sampling=_sampling(roles["critic"], cfg.seed),
        rewrite_sampling=_sampling(roles["rewriter"], cfg.seed),
    )


def _resources(cfg: SynthesizeParams) -> Resources:
    on_vllm: dict[str, GenBackend] = {
        str(role): backend for role, backend in cfg.backends.items() if backend.kind != "endpoint"
    }
    return Resources(
        roles={name: role for name, role in _roles(cfg).items() if name not in on_vllm},
        backends=on_vllm,
        sandbox=cfg.sandbox,
        row_concurrency=cfg.concurrency,
        chunk_concurrency=cfg.chunk_concurrency,
    )


def _summary(state: RunState) -> dict[str, Any]:
    return {
        "plan": plan(state.params),
        "verified": state.rows("verified"),
        "unverified": state.rows("unverified"),
    }


PIPELINE: Pipeline[SynthesizeParams, SynthesizeResult] = Pipeline(
    name="synthesize",
    params=SynthesizeParams,
    steps=[
        Step(stages.topics, _topics),
        Step(
            stages.problems,
            _problems,
            slice_rows=lambda cfg: max(1, cfg.chunk_size // cfg.problems_per_topic),
        ),
        Step(stages.dedup, lambda cfg: DedupConfig(chunk_size=cfg.chunk_size, limit=cfg.limit)),
        Step(stages.cots, _cots),
        Step(stages.verify, _verify),
    ],
    resources=_resources,
    result=SynthesizeResult,
    exports=("verified", "unverified", "dropped"),
    listed=("verified", "unverified", "dropped"),
    summary=_summary,
    ref="mathmill.flows.synthesize:PIPELINE",
    description="Generate problems and solutions; keep those whose answer code reproduces.",
)
"""topics → problems (slices of the topics) → dedup → per chunk: cots → verify."""


@pipeline_flow("synthesize")
async def synthesize(params: SynthesizeParams) -> SynthesizeResult:
    """Generate problems and solutions and keep those whose answer code reproduces."""
    return await run_synthesize(params, prefect=True)


async def run_synthesize(cfg: SynthesizeParams, *, prefect: bool) -> SynthesizeResult:
    """The pipeline. With ``prefect=False`` the same stages run as plain functions
    (no task runs, no artifacts): what ``bench/synthesize.py`` compares against.
    """
    the_plan = plan(cfg)
    PIPELINE.stage_params(cfg)  # validates every stage config before any call
    if cfg.dry_run:
        logger = get_run_logger() if prefect else logging.getLogger("mathmill.synthesize")
        logger.info("dry run: %s", the_plan.model_dump_json())
        return SynthesizeResult(out=cfg.out, plan=the_plan, dry_run=True)
    return await run_pipeline(PIPELINE, cfg, prefect=prefect)
