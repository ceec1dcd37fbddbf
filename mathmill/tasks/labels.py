"""The labelling stages that follow curate's (the AIMO pipeline's stages 2, 3, 4, 6 and
8): difficulty ladder with early exit → effective difficulty (Rasch) → heuristic
domain → structure extraction (LLM) → quality filters and leakage-proof splits.

Every stage reads and writes :class:`~mathmill.records.CuratedRow` rows; a stage
switched off passes its rows through.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mathmill import sidecar
from mathmill.labels.domain import DEFAULT_DOMAINS, DEFAULT_RULES, classify
from mathmill.labels.rasch import LadderObs, fit_rasch
from mathmill.labels.split import FilterConfig, SplitConfig, apply_filters, assign_splits
from mathmill.pipeline.chunks import drop, map_rows, raise_if_transient, split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.prompts import load_prompt
from mathmill.records import (
    CuratedRow,
    Dropped,
    ErrorInfo,
    Problem,
    Record,
    Sample,
    SamplingParams,
    Structure,
    stable_id,
)
from mathmill.tasks.generation import generate
from mathmill.tasks.sample import agrade_samples, sample_requests

__all__ = [
    "DifficultyConfig",
    "DomainConfig",
    "LadderConfig",
    "SplitStageConfig",
    "StructureConfig",
    "difficulty",
    "domains",
    "frame_rows",
    "ladder",
    "program_tokens",
    "rung_role",
    "splits",
    "structure",
]

SPLITS = ("train", "validation", "test")


def rung_role(name: str) -> str:
    """The role of ladder rung ``name``."""
    return f"rung.{name}"


class LadderConfig(BaseModel):
    """The difficulty ladder: rungs in order (small → large), samples per rung, the
    pass rate at which a problem exits.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    rungs: tuple[str, ...] = Field(min_length=1)
    temperatures: tuple[float | None, ...] = Field(
        (), description="Per rung, a temperature instead of the sampling's (None: keep)."
    )
    samples: int = Field(4, ge=1, le=256)
    threshold: float = Field(0.5, gt=0.0, le=1.0, description="Pass rate that exits.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    chunk_size: int = Field(200, ge=1, description="Rows per output chunk.")


@stage(
    "ladder",
    params=LadderConfig,
    kind="whole",
    roles=("rung.*",),
    prompts=("sample_system",),
    inputs={"classified": CuratedRow},
    outputs={"laddered": CuratedRow, "ladder_samples": Sample},
    warm=sidecar.GRADING,
)
async def ladder(chunk: Chunk, cfg: LadderConfig) -> StageResult:
    """Rung by rung over the whole set (one model loaded at a time; a deployment rung
    shares its requests out among its generate runs): each rung samples the problems no
    smaller rung solved; a problem whose pass rate reaches the threshold exits. Per
    problem: pass counts per rung, the bucket, tokens. A transient failure stops the
    ladder before the next rung (a re-run replays the finished calls); a permanent one
    leaves ``[0, 0]`` at that rung and, with no graded sample at any rung, the bucket
    ``error``.
    """
    rows: list[CuratedRow] = chunk.rows("classified")
    counts: Counter[str] = Counter()
    if not cfg.enabled:
        return StageResult(rows=dict(split_rows("laddered", rows, cfg.chunk_size)), counts=counts)
    sampling = cfg.sampling.model_copy(update={"n": cfg.samples})
    buckets: dict[str, dict[str, list[int]]] = {r.id: {} for r in rows}
    tokens: Counter[str] = Counter()
    solved_at: dict[str, str] = {}
    samples: list[Sample] = []
    errors: list[ErrorInfo] = []
    active = [Problem(id=r.id, statement=r.problem, answer=r.answer) for r in rows]
    for i, rung in enumerate(cfg.rungs):
        if not active:
            continue
        own = cfg.temperatures[i] if i < len(cfg.temperatures) else None
        rung_sampling = (
            sampling if own is None else sampling.model_copy(update={"temperature": own})
        )
        gens = await generate(
            chunk.rt,
            rung_role(rung),
            sample_requests(active, rung_sampling),
            stage=f"ladder.{rung}",
        )
        failed = [g.error for g in gens if g.error is not None]
        raise_if_transient(f"ladder.{rung}", chunk.spec.key, failed, len(gens))
        errors += failed
        counts[f"ladder.errors.{rung}"] += len(failed)
        graded = [
            s.model_copy(update={"rung": rung, "id": stable_id(s.id, rung)})
            for s in await agrade_samples(active, gens, rung_sampling)
        ]
        samples += graded
        for g in gens:
            tokens[g.id] += g.usage.prompt_tokens + g.usage.completion_tokens
        right = Counter(s.problem_id for s in graded if s.status == "correct")
        tried = Counter(s.problem_id for s in graded if s.status != "error")
        still: list[Problem] = []
        for p in active:
            n = tried[p.id]
            buckets[p.id][rung] = [right[p.id], n]
            if n and right[p.id] / n >= cfg.threshold:
                solved_at[p.id] = rung
            else:
                still.append(p)
        counts[f"ladder.calls.{rung}"] += len(active)
        counts[f"ladder.exit.{rung}"] += len(active) - len(still)
        later = len(cfg.rungs) - i - 1
        counts["ladder.samples_saved"] += (len(active) - len(still)) * later * cfg.samples
        active = still
    out: list[CuratedRow] = []
    for r in rows:
        seen = any(n > 0 for _, n in buckets[r.id].values())
        bucket = solved_at.get(r.id, "unsolved" if seen else "error")
        counts[f"ladder.bucket.{bucket}"] += 1
        update = {
            "computation_buckets": buckets[r.id],
            "bucket": bucket,
            "ladder_tokens": tokens[r.id],
        }
        out.append(r.model_copy(update=update))
    return StageResult(
        rows=dict(split_rows("laddered", out, cfg.chunk_size))
        | dict(split_rows("ladder_samples", samples, 4 * cfg.chunk_size)),
        counts=counts,
        errors=errors,
        attempted=len(rows),
    )


class DifficultyConfig(BaseModel):
    """The effective-difficulty fit over the whole ladder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    rungs: tuple[str, ...] = ()
    censored: Literal["solved", "ignore"] = Field(
        "solved", description="Rungs skipped by an early exit: likely solved, or ignored."
    )
    threshold: float = Field(0.5, gt=0.0, le=1.0, description="The ladder's exit pass rate.")
    chunk_size: int = Field(200, ge=1)


@stage(
    "difficulty",
    params=DifficultyConfig,
    kind="whole",
    inputs={"laddered": CuratedRow},
    outputs={"scored": CuratedRow},
)
async def difficulty(chunk: Chunk, cfg: DifficultyConfig) -> StageResult:
    """A Rasch (1PL) fit over every problem and rung jointly, rungs skipped by early
    exit treated as censored: each problem's difficulty, its standard error and a score
    in [0, 1].
    """
    rows: list[CuratedRow] = chunk.rows("laddered")
    counts: Counter[str] = Counter()
    observed = [r for r in rows if any(v[1] > 0 for v in r.computation_buckets.values())]
    if cfg.enabled and observed and cfg.rungs:
        obs = [
            LadderObs(r.id, {k: (int(v[0]), int(v[1])) for k, v in r.computation_buckets.items()})
            for r in observed
        ]
        fit = fit_rasch(obs, cfg.rungs, censored=cfg.censored, threshold=cfg.threshold)
        rows = [
            r.model_copy(
                update={
                    "difficulty": round(fit.normalized[r.id], 6),
                    "difficulty_raw": round(fit.difficulty[r.id], 6),
                    "difficulty_se": round(fit.stderr[r.id], 6),
                    "difficulty_method": fit.method,
                }
            )
            if r.id in fit.difficulty
            else r
            for r in rows
        ]
        counts["difficulty.scored"] = len(fit.difficulty)
        for rung, theta in fit.abilities.items():
            counts[f"difficulty.ability_x100.{rung}"] = round(theta * 100)
    return StageResult(rows=dict(split_rows("scored", rows, cfg.chunk_size)), counts=counts)


class DomainConfig(BaseModel):
    """The heuristic domain classifier and its optional pre-filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    keep: tuple[str, ...] = Field((), description="Keep only these domains (empty: all).")


@stage(
    "domains",
    params=DomainConfig,
    inputs={"curated": CuratedRow},
    outputs={"classified": CuratedRow, "off_domain": Dropped},
)
async def domains(chunk: Chunk, cfg: DomainConfig) -> StageResult:
    """Each row's domain by keyword scoring and hard rules over its text and code; with
    ``keep``, rows of other domains go to ``off_domain`` before any LLM labelling.
    """
    rows: list[CuratedRow] = chunk.rows("curated")
    counts: Counter[str] = Counter()
    if not cfg.enabled:
        return StageResult(rows={"classified": rows}, counts=counts)
    rules = DEFAULT_RULES.restrict(cfg.domains) if cfg.domains != DEFAULT_DOMAINS else None
    kept: list[CuratedRow] = []
    off: list[Dropped] = []
    for r in rows:
        label = classify(r.problem, code=r.code, rules=rules)
        row = r.model_copy(
            update={
                "domain_heuristic": label.domain,
                "domain_confidence": round(label.confidence, 4),
                "domain": r.domain or label.domain,
            }
        )
        counts[f"domains.{label.domain}"] += 1
        if cfg.keep and label.domain not in cfg.keep:
            off.append(drop("domains", "off_domain", row, r.id, f"{label.domain} ({label.rule})"))
            continue
        kept.append(row)
    out: dict[str, Sequence[Record]] = {"classified": kept}
    if off:
        out["off_domain"] = off
    return StageResult(rows=out, counts=counts)


class StructureReply(BaseModel):
    """The labeller's structured reply (lenient: a weak model may omit fields)."""

    domain: str = ""
    subdomain: str = ""
    objects: list[str] = Field(default_factory=list)
    constraints: list[str] = Field(default_factory=list)
    answer_type: str = ""
    reasoning_patterns: list[str] = Field(default_factory=list)
    case_analysis: bool = False
    construction: bool = False
    techniques: list[str] = Field(default_factory=list)
    depth: int = 0


class StructureConfig(BaseModel):
    """Structure extraction by the labeller role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.0))


@stage(
    "structure",
    params=StructureConfig,
    roles=("labeler",),
    prompts=("label_structure",),
    inputs={"scored": CuratedRow},
    outputs={"labeled": CuratedRow},
)
async def structure(chunk: Chunk, cfg: StructureConfig) -> StageResult:
    """The problem's and the solution's structure, read by the labeller (structured
    output); a reply that does not parse leaves ``structure`` empty, counted.
    """
    rows: list[CuratedRow] = chunk.rows("scored")
    counts: Counter[str] = Counter()
    if not cfg.enabled:
        return StageResult(rows={"labeled": rows}, counts=counts)
    client = chunk.rt.client("labeler")
    prompt = load_prompt("label_structure")

    async def one(r: CuratedRow) -> tuple[CuratedRow, ErrorInfo | None]:
        got = await client.structured(
            [{"role": "user", "content": prompt.render(problem=r.problem, code=r.code)}],
            StructureReply,
            stage="structure",
            sampling=cfg.sampling,
            raise_on_error=False,
        )
        if got.value is None:
            return r, got.result.error or got.error
        value = got.value
        depth = max(0, min(100, int(value.depth)))
        found = Structure(
            **value.model_dump(exclude={"depth"}),
            depth=depth,
            model=got.result.model or client.endpoint.model,
        )
        return r.model_copy(update={"structure": found}), None

    done = await map_rows(rows, one, chunk.rt.row_concurrency)
    errors = [e for _, e in done if e is not None]
    counts["structure.extracted"] = sum(1 for r, _ in done if r.structure is not None)
    counts["structure.failed"] = len(rows) - counts["structure.extracted"]
    return StageResult(
        rows={"labeled": [r for r, _ in done]},
        counts=counts,
        errors=errors,
        attempted=len(rows),
    )


class SplitStageConfig(BaseModel):
    """Quality filters, then stratified splits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    filters: FilterConfig = Field(default_factory=FilterConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    chunk_size: int = Field(500, ge=1)


_TOKENS = re.compile(r"\w+|[^\w\s]")
FRAME_COLUMNS = (
    "bucket",
    "domain",
    "domain_heuristic",
    "source",
    "difficulty",
    "subdomain",
    "tokens",
    "leaking",
)
"""The columns quality filters and split strata can name (``require_labels``,
``stratify_by``, ``outlier_by``)."""


def program_tokens(code: str) -> int:
    """The length of a solution program in tokens (words, numbers and symbols): what
    the length filter measures (not what its repair rounds spent).
    """
    return len(_TOKENS.findall(code))


def frame_rows(rows: Sequence[CuratedRow]) -> list[dict[str, Any]]:
    """The rows as the filters and splits see them (:data:`FRAME_COLUMNS`)."""
    return [
        {
            "id": r.id,
            "cluster_id": r.cluster_id,
            "bucket": r.bucket,
            "domain": r.domain,
            "domain_heuristic": r.domain_heuristic,
            "source": r.source,
            "difficulty": r.difficulty,
            "subdomain": r.structure.subdomain or None if r.structure is not None else None,
            "tokens": program_tokens(r.code) if r.code else None,
            "leaking": r.leak_verdict not in ("none", "cleared", "repaired"),
        }
        for r in rows
    ]


@stage(
    "splits",
    params=SplitStageConfig,
    kind="whole",
    inputs={"labeled": CuratedRow},
    outputs={
        "train": CuratedRow,
        "validation": CuratedRow,
        "test": CuratedRow,
        "filtered": Dropped,
    },
)
async def splits(chunk: Chunk, cfg: SplitStageConfig) -> StageResult:
    """Quality filters (each with its reason), then train/validation/test stratified by
    difficulty bucket and domain, no near-duplicate cluster on two sides; seeded.
    """
    import polars as pl

    rows: list[CuratedRow] = chunk.rows("labeled")
    counts: Counter[str] = Counter()
    if not cfg.enabled or not rows:
        return StageResult(rows=dict(split_rows("train", rows, cfg.chunk_size)), counts=counts)
    frame = pl.DataFrame(
        frame_rows(rows),
        schema_overrides={"tokens": pl.Int64, "difficulty": pl.Float64, "leaking": pl.Boolean},
    )
    kept, removed = apply_filters(frame, cfg.filters)
    by_id = {r.id: r for r in rows}
    filtered = [
        drop("splits", str(reason), by_id[str(i)], str(i), str(reason))
        for i, reason in zip(removed["id"], removed["reason"], strict=True)
    ]
    for d in filtered:
        counts[f"splits.filtered.{d.reason}"] += 1
    assigned = assign_splits(kept, cfg.split)
    out: dict[str, Sequence[Record]] = {}
    for name in SPLITS:
        ids = assigned.filter(pl.col("split") == name)["id"].to_list()
        part = [by_id[i].model_copy(update={"split": name}) for i in ids]
        counts[f"splits.{name}"] = len(part)
        out.update(split_rows(name, part, cfg.chunk_size))
    if filtered:
        out["filtered"] = filtered
    return StageResult(rows=out, counts=counts)
