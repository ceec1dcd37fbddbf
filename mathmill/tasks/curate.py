"""The stages of the curate pipeline, declared for the pipeline kit: (load) →
normalize → dedup → decontaminate → solve → leaks.

Every stage passes rows on or puts them in a side output with the reason
(``duplicates``, ``contaminated``, ``unsolved``, ``leaking``: :class:`Dropped` rows),
so every input row is accounted for. A stage whose ``enabled`` is off passes its
rows through unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mathmill.curate.contamination import cached_index
from mathmill.curate.neardup import cluster
from mathmill.curate.text import normalize_answer, normalize_statement
from mathmill.pipeline.chunks import drop, map_rows, split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.records import Attempt, CuratedRow, Dropped, ErrorInfo, Problem, Record
from mathmill.tasks.leakcheck import LeakConfig, check_row
from mathmill.tasks.solve import SolveConfig, curated_row, last_status, solve_problem, solved_by

__all__ = [
    "DecontamConfig",
    "DedupConfig",
    "NormalizeConfig",
    "decontaminate",
    "dedup",
    "leaks",
    "normalize",
    "solve",
]


class NormalizeConfig(BaseModel):
    """Config of the normalize stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True


@stage(
    "normalize",
    params=NormalizeConfig,
    inputs={"problems": Problem},
    outputs={"normalized": Problem},
)
async def normalize(chunk: Chunk, cfg: NormalizeConfig) -> StageResult:
    """One schema for everything after: the statement and answer normalized (NFKC,
    whitespace, LaTeX spacing; the answer through the grader's normalizer), the
    originals kept in ``metadata.original_statement`` / ``original_answer``.
    """
    rows: list[Problem] = chunk.rows("problems")
    out: list[Problem] = []
    counts: Counter[str] = Counter()
    for p in rows:
        if not cfg.enabled:
            out.append(p)
            continue
        statement = normalize_statement(p.statement) or p.statement
        answer = normalize_answer(p.answer) if p.answer is not None else None
        counts["normalize.statement_changed"] += statement != p.statement
        counts["normalize.answer_changed"] += answer != p.answer
        meta = {**p.metadata, "original_statement": p.statement, "original_answer": p.answer}
        out.append(
            p.model_copy(update={"statement": statement, "answer": answer, "metadata": meta})
        )
    counts["normalize.rows"] = len(out)
    return StageResult(rows={"normalized": out}, counts=counts)


class DedupConfig(BaseModel):
    """Config of the dedup stage (exact and near duplicates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    near: bool = Field(True, description="Also near duplicates (MinHash LSH), not only exact.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity threshold.")
    unit: Literal["char", "word"] = Field("char", description="Shingles of characters or words.")
    shingle: int = Field(5, ge=1, le=20, description="Units per shingle.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    seed: int = 1
    chunk_size: int = Field(200, ge=1, description="Problems per output chunk.")


@stage(
    "dedup",
    params=DedupConfig,
    kind="whole",
    inputs={"normalized": Problem},
    outputs={"unique": Problem, "duplicates": Dropped},
)
async def dedup(chunk: Chunk, cfg: DedupConfig) -> StageResult:
    """Exact and near duplicates over the whole set: one representative per cluster
    (the first in input order) is kept; every row records its cluster id; the others
    go to ``duplicates`` naming their representative and similarity.
    """
    rows: list[Problem] = chunk.rows("normalized")
    counts: Counter[str] = Counter()
    if not cfg.enabled:
        return StageResult(rows=dict(split_rows("unique", rows, cfg.chunk_size)), counts=counts)
    # the first row of a cluster is kept: rows with a reference answer go first
    rows = sorted(rows, key=lambda p: not p.answer)
    found = cluster(
        [p.id for p in rows],
        [p.statement for p in rows],
        threshold=cfg.threshold if cfg.near else 1.0,
        shingle=cfg.shingle,
        unit=cfg.unit,
        num_perm=cfg.num_perm,
        seed=cfg.seed,
        near=cfg.near,
    )
    kept: list[Problem] = []
    duplicates: list[Dropped] = []
    by_id = {p.id: p for p in rows}
    sizes = Counter(found.cluster_id)
    for i, p in enumerate(rows):
        cid = found.cluster_id[i]
        meta = {**p.metadata, "cluster_id": cid, "cluster_size": sizes[cid]}
        row = p.model_copy(update={"metadata": meta})
        if found.representative[i]:
            kept.append(row)
            continue
        kind = found.kind[i]
        reason = "duplicate" if kind == "exact" else "near_duplicate"
        sim = found.similarity[i]
        detail = f"same cluster as {found.representative_id[i]}" + (
            f" (Jaccard ~{sim:.2f})" if sim is not None and kind != "exact" else ""
        )
        kept_answer = by_id[str(found.representative_id[i])].answer
        if kind == "exact" and p.answer and kept_answer and p.answer != kept_answer:
            detail += f"; its answer {p.answer!r} differs from the kept {kept_answer!r}"
            counts["dedup.conflicting_answers"] += 1
        duplicates.append(drop("dedup", reason, row, p.id, detail))
        counts[f"dedup.{reason}"] += 1
    counts["dedup.kept"] = len(kept)
    counts["dedup.clusters"] = len(sizes)
    out: dict[str, Sequence[Record]] = dict(split_rows("unique", kept, cfg.chunk_size))
    if duplicates:
        out["duplicates"] = duplicates
    return StageResult(rows=out, counts=counts)


class DecontamConfig(BaseModel):
    """Config of the decontaminate stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    benchmarks: tuple[str, ...] = ("math500", "gsm8k", "amc23", "aime")
    extra: tuple[str, ...] = Field((), description="More benchmark sets: paths or hf:NAME.")
    identity: str = Field("", description="The benchmark files' content (cache key).")
    ngram: int = Field(6, ge=3, le=50, description="Words per n-gram.")
    overlap: float = Field(0.5, gt=0.0, le=1.0, description="Share of an item's n-grams.")


@stage(
    "decontaminate",
    params=DecontamConfig,
    inputs={"unique": Problem},
    outputs={"clean": Problem, "contaminated": Dropped},
)
async def decontaminate(chunk: Chunk, cfg: DecontamConfig) -> StageResult:
    """Rows matching a benchmark item (the same text, or enough of its n-grams) go to
    ``contaminated`` with the matched item; the rest are passed on.
    """
    rows: list[Problem] = chunk.rows("unique")
    counts: Counter[str] = Counter()
    if not cfg.enabled:
        return StageResult(rows={"clean": rows}, counts=counts)
    index = cached_index(cfg.benchmarks, cfg.extra, cfg.ngram, cfg.identity)
    matches = index.match_many([p.statement for p in rows], threshold=cfg.overlap)
    clean: list[Problem] = []
    contaminated: list[Dropped] = []
    for p, m in zip(rows, matches, strict=True):
        if m is None:
            clean.append(p)
            continue
        meta = {**p.metadata, "contamination": m.as_dict()}
        detail = f"{m.kind} match with {m.benchmark} item {m.item_id} (overlap {m.overlap:.2f})"
        contaminated.append(
            drop(
                "decontaminate",
                "contaminated",
                p.model_copy(update={"metadata": meta}),
                p.id,
                detail,
            )
        )
        counts[f"decontaminate.{m.benchmark}"] += 1
    counts["decontaminate.clean"] = len(clean)
    out: dict[str, Sequence[Record]] = {"clean": clean}
    if contaminated:
        out["contaminated"] = contaminated
    return StageResult(rows=out, counts=counts)


@stage(
    "solve",
    params=SolveConfig,
    roles=("solver",),
    prompts=("curate_solve", "curate_repair"),
    inputs={"clean": Problem},
    outputs={"solve_attempts": Attempt, "solved": CuratedRow, "unsolved": Dropped},
)
async def solve(chunk: Chunk, cfg: SolveConfig) -> StageResult:
    """Each problem solved by a program from the problem alone, run in the sandbox and
    graded against the reference, with repair rounds; unsolved ones (and those with no
    reference answer) go to ``unsolved`` with their last failure.
    """
    rows: list[Problem] = chunk.rows("clean")
    counts: Counter[str] = Counter()
    unsolved: list[Dropped] = []
    todo = [p for p in rows if p.answer]
    for p in rows:
        if not p.answer:
            unsolved.append(drop("solve", "no_reference", p, p.id, "no reference answer"))
            counts["solve.unsolved.no_reference"] += 1

    async def one(p: Problem) -> list[list[Attempt]]:
        return await solve_problem(chunk.rt, cfg, p)

    results = await map_rows(todo, one, chunk.rt.row_concurrency)
    attempts: list[Attempt] = []
    solved: list[CuratedRow] = []
    errors: list[ErrorInfo] = []
    for p, lineages in zip(todo, results, strict=True):
        for lin in lineages:
            attempts.extend(lin)
            counts["solve.repairs"] += len(lin) - 1
            errors.extend(a.error for a in lin[-1:] if a.error is not None)
        best = solved_by(lineages)
        if best is None:
            status, reason = last_status(lineages)
            unsolved.append(drop("solve", status, p, p.id, reason))
            counts[f"solve.unsolved.{status}"] += 1
            continue
        good = sum(
            1 for lin in lineages if lin[-1].verdict and lin[-1].verdict.status == "verified"
        )
        solved.append(curated_row(p, best, good, cfg.samples))
        counts[f"solve.solved_round_{best[-1].round}"] += 1
    out: dict[str, Sequence[Record]] = {"solve_attempts": attempts, "solved": solved}
    if unsolved:
        out["unsolved"] = unsolved
    return StageResult(rows=out, counts=counts, errors=errors, attempted=len(todo))


@stage(
    "leaks",
    params=LeakConfig,
    roles=("solver", "judge"),
    prompts=("curate_leak_judge", "curate_leak_repair"),
    inputs={"solved": CuratedRow},
    outputs={"curated": CuratedRow, "leak_attempts": Attempt, "leaking": Dropped},
)
async def leaks(chunk: Chunk, cfg: LeakConfig) -> StageResult:
    """Flagged programs judged; confirmed leaks repaired and re-verified; what still
    leaks goes to ``leaking``.
    """
    rows: list[CuratedRow] = chunk.rows("solved")
    outcomes = await map_rows(rows, lambda r: check_row(chunk.rt, cfg, r), chunk.rt.row_concurrency)
    counts: Counter[str] = Counter()
    curated: list[CuratedRow] = []
    attempts: list[Attempt] = []
    leaking: list[Dropped] = []
    errors: list[ErrorInfo] = []
    for o in outcomes:
        counts[f"leaks.{o.outcome}"] += 1
        attempts.extend(o.attempts)
        if o.error is not None:
            errors.append(o.error)
        if o.row is not None:
            curated.append(o.row)
        if o.dropped is not None:
            leaking.append(o.dropped)
    out: dict[str, Sequence[Record]] = {"curated": curated}
    if attempts:
        out["leak_attempts"] = attempts
    if leaking:
        out["leaking"] = leaking
    return StageResult(rows=out, counts=counts, errors=errors, attempted=len(rows))
