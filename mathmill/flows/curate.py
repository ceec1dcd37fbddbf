"""The ``curate`` flow: problems with reference answers from files, datasets or SQL
databases → normalized → deduplicated (exact and near) → decontaminated against
benchmarks → solved by a program run in the sandbox, with repair rounds → leak
checked and repaired → a curated set where every problem has code that computes its
answer, and a side output for every row that did not make it, with the reason.

>>> CurateParams(input="problems.jsonl").rounds
2
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from pydantic import ConfigDict, Field

from mathmill.flows.options import InputFields, ModelRole, SandboxOptions, StorageFields
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.fanout import FanOutFields
from mathmill.pipeline.finish import RunResult
from mathmill.records import SamplingParams
from mathmill.tasks import curate as stages
from mathmill.tasks.curate import DecontamConfig, DedupConfig, NormalizeConfig
from mathmill.tasks.leakcheck import LeakConfig
from mathmill.tasks.load import LoadConfig, load
from mathmill.tasks.solve import SolveConfig

__all__ = ["PIPELINE", "SIDE_OUTPUTS", "CurateParams", "CurateResult", "curate"]

SOLVER_DEFAULTS = ModelRole(temperature=0.2, max_tokens=1024)
JUDGE_DEFAULTS = ModelRole(temperature=0.0, max_tokens=256)
SIDE_OUTPUTS = ("dropped", "duplicates", "contaminated", "unsolved", "leaking")
"""The side outputs, each a file of :class:`~mathmill.records.Dropped` rows with reasons."""


class CurateParams(InputFields, FanOutFields, BudgetFields, StorageFields):
    """Parameters of the curate flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(
        "runs/curate",
        description="Run directory: local path, s3://bucket/prefix, or a path inside "
        "storage_block (re-run to resume).",
    )
    normalize: bool = Field(True, description="Normalize text and answers (originals kept).")
    dedup: bool = Field(True, description="Drop exact duplicates.")
    near_dedup: bool = Field(True, description="Also near duplicates (MinHash LSH).")
    near_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Near-duplicate Jaccard.")
    shingle: int = Field(5, ge=1, le=20, description="Units per near-duplicate shingle.")
    shingle_unit: Literal["char", "word"] = Field(
        "char", description="Near-duplicate shingles of characters (robust to reordering) or words."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    decontaminate: bool = Field(True, description="Drop problems found in benchmarks.")
    benchmarks: list[str] = Field(
        default_factory=lambda: ["math500", "gsm8k", "amc23", "aime"],
        description="Bundled benchmark sets checked against (math500, gsm8k, amc23, aime).",
    )
    extra_benchmarks: list[str] = Field(
        default_factory=list, description="More benchmark sets: .jsonl/.parquet paths or hf:NAME."
    )
    ngram: int = Field(6, ge=3, le=50, description="Words per decontamination n-gram.")
    overlap: float = Field(
        0.5, gt=0.0, le=1.0, description="Share of a benchmark item's n-grams that matches it."
    )
    rounds: int = Field(2, ge=0, le=10, description="Repair rounds for a failed program.")
    samples: int = Field(1, ge=1, le=64, description="Programs per problem (pass@k).")
    leak_check: bool = Field(True, description="Check programs for hard-coded answers.")
    leak_judge: bool = Field(True, description="An LLM judge confirms a flagged program.")
    leak_rounds: int = Field(1, ge=0, le=5, description="Repair rounds for a confirmed leak.")
    chunk_size: int = Field(100, ge=1, le=100_000, description="Problems per chunk (task).")
    concurrency: int = Field(16, ge=1, le=4096, description="Problems in flight per chunk.")
    chunk_concurrency: int = Field(2, ge=1, le=256, description="Chunks in flight at once.")
    seed: int = Field(0, ge=0, description="Sampling seed; sample i uses seed + i.")
    dry_run: bool = Field(False, description="Validate, check the input; call nothing.")
    solver: ModelRole = Field(default_factory=ModelRole, description="Writes the programs.")
    judge: ModelRole = Field(default_factory=ModelRole, description="Judges flagged programs.")
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions)


class CurateResult(RunResult):
    """Where a curate run's outputs are, and how many rows went where."""

    read: int = 0
    curated: int = 0
    duplicates: int = 0
    contaminated: int = 0
    unsolved: int = 0
    leaking: int = 0
    dropped: int = 0


def _solve(p: CurateParams) -> SolveConfig:
    role = p.solver.over(SOLVER_DEFAULTS)
    return SolveConfig(
        rounds=p.rounds,
        samples=p.samples,
        limits=p.sandbox.limits,
        sampling=SamplingParams(
            temperature=role.temperature, max_tokens=role.max_tokens, seed=p.seed
        ),
    )


def _decontam(p: CurateParams) -> DecontamConfig:
    return DecontamConfig(
        enabled=p.decontaminate,
        benchmarks=tuple(p.benchmarks),
        extra=tuple(p.extra_benchmarks),
        identity=_benchmarks_identity(p.benchmarks, p.extra_benchmarks),
        ngram=p.ngram,
        overlap=p.overlap,
    )


def _benchmarks_identity(names: list[str], extra: list[str]) -> str:
    """The benchmark sets' content for the cache key: bundled files and local extra
    files by content hash, hf: names by name.
    """
    from importlib import resources

    digest = hashlib.sha256()
    base = resources.files("mathmill.data").joinpath("benchmarks")
    digest.update(repr(sorted(names)).encode())
    for entry in sorted(base.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".jsonl"):
            digest.update(entry.read_bytes())
    for source in extra:
        digest.update(source.encode())
        if Path(source).is_file():
            digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _resources(p: CurateParams) -> Resources:
    return Resources(
        roles={
            "solver": p.solver.over(SOLVER_DEFAULTS),
            "judge": p.judge.over(p.solver).over(JUDGE_DEFAULTS),
        },
        sandbox=p.sandbox,
        row_concurrency=p.concurrency,
        chunk_concurrency=p.chunk_concurrency,
    )


def _summary(state: RunState) -> dict[str, Any]:
    fields = {name: state.rows(name) for name in ("curated", *SIDE_OUTPUTS)}
    return fields | {"read": state.rows("problems")}


def _report(state: RunState) -> str:
    read, curated = state.rows("problems"), state.rows("curated")
    lost = ", ".join(f"{state.rows(n)} {n}" for n in SIDE_OUTPUTS if state.rows(n))
    return (
        f"{read} problems read, {curated} curated"
        + (f"; side outputs: {lost}" if lost else "")
        + ". Every problem in `curated` has a program that computes its reference answer "
        "in the sandbox."
    )


def _stats(state: RunState) -> list[dict[str, Any]]:
    counts = state.tracker.counts
    solved = sum(v for k, v in counts.items() if k.startswith("solve.solved_round_"))
    tried = solved + sum(
        v
        for k, v in counts.items()
        if k.startswith("solve.unsolved.") and k != "solve.unsolved.no_reference"
    )
    rows = [
        {"metric": "problems read", "value": state.rows("problems")},
        {"metric": "curated", "value": state.rows("curated")},
        {
            "metric": "solve rate (solved / tried)",
            "value": round(solved / tried, 4) if tried else 0.0,
        },
    ]
    for key in sorted(counts):
        if key.startswith("solve.solved_round_"):
            rows.append(
                {"metric": f"solved after {key.rsplit('_', 1)[1]} repairs", "value": counts[key]}
            )
    rows += [{"metric": n, "value": state.rows(n)} for n in SIDE_OUTPUTS]
    return rows


def _exports(state: RunState) -> dict[str, str]:
    """``curated.parquet`` (one file) and ``hf/``: the curated set saved with
    ``datasets``' ``save_to_disk`` (loadable by ``datasets.load_from_disk``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = state.rt.store
    refs = [r for r in state.refs if r.dataset == "curated"]
    tables = [store.dataset("curated").read_table(r) for r in refs]
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        return {}
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    outputs = {
        "curated.parquet": store.write_bytes("curated.parquet", sink.getvalue().to_pybytes())
    }
    outputs["hf"] = _save_to_disk(store, table)
    return outputs


def _save_to_disk(store: Any, table: Any) -> str:
    """The table as a ``datasets`` dataset under ``<run>/hf`` (written locally, then
    copied file by file into the run directory, local or object storage).
    """
    import datasets

    from mathmill.sources import pyarrow_knows_pandas

    pyarrow_knows_pandas()
    with tempfile.TemporaryDirectory() as tmp:
        datasets.Dataset(table.replace_schema_metadata(None)).save_to_disk(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                store.write_bytes(f"hf/{path.relative_to(tmp).as_posix()}", path.read_bytes())
    return f"{store.url}/hf"


PIPELINE: Pipeline[CurateParams, CurateResult] = Pipeline(
    name="curate",
    params=CurateParams,
    steps=[
        Step(load, lambda p: LoadConfig(**p.load_config(p.chunk_size))),
        Step(stages.normalize, lambda p: NormalizeConfig(enabled=p.normalize)),
        Step(
            stages.dedup,
            lambda p: DedupConfig(
                enabled=p.dedup,
                near=p.near_dedup,
                threshold=p.near_threshold,
                shingle=p.shingle,
                unit=p.shingle_unit,
                num_perm=p.num_perm,
                seed=p.seed + 1,
                chunk_size=p.chunk_size,
            ),
        ),
        Step(stages.decontaminate, _decontam),
        Step(stages.solve, _solve),
        Step(
            stages.leaks,
            lambda p: LeakConfig(
                enabled=p.leak_check, judge=p.leak_judge, rounds=p.leak_rounds, solve=_solve(p)
            ),
        ),
    ],
    resources=_resources,
    result=CurateResult,
    exports=("curated", *SIDE_OUTPUTS),
    listed=("curated", "solve_attempts"),
    extra_exports=_exports,
    report=_report,
    stats=_stats,
    summary=_summary,
    ref="mathmill.flows.curate:PIPELINE",
    description="Problems from files, datasets or SQL: normalized, deduplicated, "
    "decontaminated, solved by verified code with repair, leak-checked.",
)
"""load → normalize → dedup (whole) → decontaminate → solve → leaks → exports."""


@flow(name="curate", validate_parameters=True, log_prints=False)
async def curate(params: CurateParams) -> CurateResult:
    """Curate problems with reference answers into a set where every problem has code
    that computes its answer in the sandbox.
    """
    return await run_pipeline(PIPELINE, params)
