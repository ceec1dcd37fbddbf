"""The ``curate`` flow: problems with reference answers from files, datasets or SQL
databases → normalized → deduplicated (exact and near) → decontaminated against
benchmarks → solved by a program run in the sandbox, with repair rounds → leak
checked and repaired → a curated set where every problem has code that computes its
answer → domain (heuristic) → difficulty ladder with early exit → Rasch difficulty →
structure (LLM) → quality filters and train/validation/test splits that keep
near-duplicate clusters together; a side output for every row that did not make it,
with the reason (docs/curate.md).

>>> CurateParams(input="problems.jsonl").rounds
2
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mathmill.curate.contamination import DEFAULT_BENCHMARKS
from mathmill.flows.options import InputFields, ModelRole, SandboxOptions, StorageFields
from mathmill.labels.domain import DEFAULT_DOMAINS
from mathmill.labels.split import FilterConfig, SplitConfig
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.fanout import FanOutFields
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import SamplingParams
from mathmill.tasks import curate as stages
from mathmill.tasks import labels
from mathmill.tasks.curate import DecontamConfig, DedupConfig, NormalizeConfig
from mathmill.tasks.generation import GenBackend, place_roles
from mathmill.tasks.labels import (
    FRAME_COLUMNS,
    SPLITS,
    DifficultyConfig,
    DomainConfig,
    LadderConfig,
    SplitStageConfig,
    StructureConfig,
    rung_role,
)
from mathmill.tasks.leakcheck import LeakConfig
from mathmill.tasks.load import LoadConfig, load
from mathmill.tasks.solve import SolveConfig

__all__ = ["PIPELINE", "SIDE_OUTPUTS", "CurateParams", "CurateResult", "curate"]

SOLVER_DEFAULTS = ModelRole(temperature=0.2, max_tokens=1024)
JUDGE_DEFAULTS = ModelRole(temperature=0.0, max_tokens=256)
LABELER_DEFAULTS = ModelRole(temperature=0.0, max_tokens=768)
SIDE_OUTPUTS = (
    "dropped",
    "duplicates",
    "contaminated",
    "unsolved",
    "leaking",
    "off_domain",
    "filtered",
)
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
    # -- labels and splits (the seed's stages 2-8) ------------------------------------
    ladder: bool = Field(True, description="Run the difficulty ladder.")
    rungs: list[LadderRung] = Field(
        default_factory=lambda: [LadderRung(name="base")],
        min_length=1,
        max_length=20,
        description="The ladder's models, smallest first (each a role with its backend).",
    )
    ladder_samples: int = Field(4, ge=1, le=256, description="Samples per problem per rung.")
    exit_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="Pass rate at which a problem leaves the ladder."
    )
    ladder_temperature: float = Field(0.7, ge=0.0, le=2.0)
    ladder_max_tokens: int = Field(1024, ge=16, le=131072)
    difficulty: bool = Field(True, description="Fit the effective difficulty (Rasch).")
    classify: bool = Field(True, description="Heuristic domain classifier.")
    keep_domains: list[str] = Field(
        default_factory=list, description="Keep only these domains (before LLM labels)."
    )
    structure: bool = Field(True, description="Extract the structure with the labeller.")
    labeler: ModelRole = Field(
        default_factory=ModelRole, description="Structure extraction (default: the solver's)."
    )
    assign_splits: bool = Field(True, description="Quality filters and train/validation/test.")
    filters: FilterConfig = Field(default_factory=FilterConfig)
    splits: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _settings_exist(self) -> CurateParams:
        """Unknown benchmarks, missing benchmark files, clashing rung names, unknown
        domains and filter or split columns fail before any stage runs.
        """
        names = [r.name for r in self.rungs]
        if len(set(names)) != len(names):
            raise ValueError(f"rungs: names must differ ({names})")
        if clash := {"unsolved", "error"} & set(names):
            raise ValueError(f"rungs: {sorted(clash)} is a bucket name; choose another")
        if bad := [d for d in self.keep_domains if d not in DEFAULT_DOMAINS]:
            raise ValueError(f"keep_domains: unknown {bad} (known: {', '.join(DEFAULT_DOMAINS)})")
        columns = [
            *self.filters.require_labels,
            *self.filters.outlier_by,
            *self.splits.stratify_by,
        ]
        if bad := [c for c in columns if c not in FRAME_COLUMNS]:
            raise ValueError(
                f"filters/splits: unknown columns {bad} (known: {', '.join(FRAME_COLUMNS)})"
            )
        if not self.decontaminate:
            return self
        unknown = [n for n in self.benchmarks if n not in DEFAULT_BENCHMARKS]
        if unknown:
            known = ", ".join(DEFAULT_BENCHMARKS)
            raise ValueError(f"benchmarks: unknown {unknown} (bundled: {known})")
        missing = [
            e for e in self.extra_benchmarks if not e.startswith("hf:") and not Path(e).exists()
        ]
        if missing:
            raise ValueError(
                f"extra_benchmarks: {missing} do not exist (a file, a directory or hf:NAME)"
            )
        return self


class LadderRung(BaseModel):
    """One rung of the difficulty ladder: a model (its role is ``rung.<name>``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    model: ModelRole = Field(
        default_factory=ModelRole, description="The rung's model (default: the solver's)."
    )
    backend: GenBackend = Field(
        default_factory=GenBackend, description="Where it generates (endpoint by default)."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Its sampling temperature (default: ladder_temperature)."
    )


class CurateResult(RunResult):
    """Where a curate run's outputs are, and how many rows went where."""

    read: int = 0
    curated: int = 0
    duplicates: int = 0
    contaminated: int = 0
    unsolved: int = 0
    leaking: int = 0
    dropped: int = 0
    train: int = 0
    validation: int = 0
    test: int = 0
    filtered: int = 0
    off_domain: int = 0


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


def _ladder(p: CurateParams) -> LadderConfig:
    return LadderConfig(
        enabled=p.ladder,
        rungs=tuple(r.name for r in p.rungs),
        temperatures=tuple(r.temperature for r in p.rungs),
        samples=p.ladder_samples,
        threshold=p.exit_threshold,
        chunk_size=p.chunk_size,
        sampling=SamplingParams(
            temperature=p.ladder_temperature, max_tokens=p.ladder_max_tokens, seed=p.seed
        ),
    )


def _decontam(p: CurateParams) -> DecontamConfig:
    return DecontamConfig(
        enabled=p.decontaminate,
        benchmarks=tuple(p.benchmarks),
        extra=tuple(p.extra_benchmarks),
        identity=_benchmarks_identity(p.benchmarks, p.extra_benchmarks) if p.decontaminate else "",
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
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                digest.update(str(file.relative_to(path) if file != path else "").encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def _resources(p: CurateParams) -> Resources:
    roles = {
        "solver": p.solver.over(SOLVER_DEFAULTS),
        "judge": p.judge.over(p.solver).over(JUDGE_DEFAULTS),
        "labeler": p.labeler.over(p.solver).over(LABELER_DEFAULTS),
    }
    rungs = {rung_role(r.name): (r.model.over(p.solver), r.backend) for r in p.rungs}
    on_endpoints, backends = place_roles(rungs if p.ladder else {})
    roles |= on_endpoints
    return Resources(
        roles=roles,
        backends=backends,
        sandbox=p.sandbox,
        row_concurrency=p.concurrency,
        chunk_concurrency=p.chunk_concurrency,
    )


def _summary(state: RunState) -> dict[str, Any]:
    fields = {name: state.rows(name) for name in ("curated", *SPLITS, *SIDE_OUTPUTS)}
    return fields | {"read": state.rows("problems")}


def _report(state: RunState) -> str:
    read, curated = state.rows("problems"), state.rows("curated")
    lost = ", ".join(f"{state.rows(n)} {n}" for n in SIDE_OUTPUTS if state.rows(n))
    text = (
        f"{read} problems read, {curated} curated"
        + (f"; side outputs: {lost}" if lost else "")
        + ". Every problem in `curated` has a program that computes its reference answer "
        "in the sandbox."
    )
    strata = _split_report(state)
    if strata:
        lines = ["", "", "## Splits by stratum (`splits.json`)", ""]
        lines += [
            "| stratum | rows | clusters | train | validation | test |",
            "|---|---|---|---|---|---|",
        ]
        for e in strata:
            got = [f"{e['counts'][s]} ({e['achieved'][s]:.0%})" for s in SPLITS]
            lines.append(
                f"| {e['stratum']} | {e['rows']} | {e['clusters']} | " + " | ".join(got) + " |"
            )
        target = strata[-1]["target"]
        lines += ["", "Targets: " + ", ".join(f"{s} {target[s]:.0%}" for s in SPLITS) + "."]
        text += "\n".join(lines)
    return text


def _split_report(state: RunState) -> list[dict[str, Any]]:
    """The achieved proportions per stratum of the splits (empty when none were made);
    computed once at the end (``splits.json`` and the report read it).
    """
    cached: list[dict[str, Any]] | None = state.rt.extra.get("split_report")
    if cached is None:
        cached = state.rt.extra["split_report"] = _compute_split_report(state)
    return cached


def _compute_split_report(state: RunState) -> list[dict[str, Any]]:
    import polars as pl

    from mathmill.labels.split import split_report
    from mathmill.records import CuratedRow
    from mathmill.tasks.labels import frame_rows

    store = state.rt.store
    rows = [
        row | {"split": ref.dataset}
        for ref in state.refs
        if ref.dataset in SPLITS
        for row in frame_rows(store.dataset(ref.dataset).read_chunk(ref, CuratedRow))
    ]
    if not rows or not state.params.assign_splits:
        return []
    frame = pl.DataFrame(rows, schema_overrides={"tokens": pl.Int64, "difficulty": pl.Float64})
    return split_report(frame, state.params.splits)


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
    """One Parquet file per output set (``curated.parquet``, ``train.parquet``, ...) and
    ``hf/``: the splits as a ``datasets`` DatasetDict (the curated set as one Dataset when
    the split stage is off), loadable with ``datasets.load_from_disk``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = state.rt.store
    outputs: dict[str, str] = {}
    tables: dict[str, Any] = {}
    for name in ("curated", *SPLITS):
        parts = [store.dataset(name).read_table(r) for r in state.refs if r.dataset == name]
        if not parts:
            continue
        table = pa.concat_tables(parts).replace_schema_metadata(None)
        tables[name] = table
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        outputs[f"{name}.parquet"] = store.write_bytes(
            f"{name}.parquet", sink.getvalue().to_pybytes()
        )
    splits = {n: t for n, t in tables.items() if n in SPLITS}
    if splits and state.params.assign_splits:
        outputs["hf"] = _save_to_disk(store, splits)
        data = json.dumps(_split_report(state), indent=2).encode()
        outputs["splits.json"] = store.write_bytes("splits.json", data)
    elif "curated" in tables:
        outputs["hf"] = _save_to_disk(store, tables["curated"])
    return outputs


def _save_to_disk(store: Any, tables: Any) -> str:
    """A table (a ``Dataset``) or split name -> table (a ``DatasetDict``) saved with
    ``datasets`` under ``<run>/hf``: written locally, then copied file by file into the
    run directory (local or object storage).
    """
    import datasets

    from mathmill.sources import pyarrow_knows_pandas

    pyarrow_knows_pandas()
    if isinstance(tables, dict):
        data: Any = datasets.DatasetDict(
            {k: datasets.Dataset(_without_maps(v)) for k, v in tables.items()}
        )
    else:
        data = datasets.Dataset(_without_maps(tables))
    with tempfile.TemporaryDirectory() as tmp:
        data.save_to_disk(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                store.write_bytes(f"hf/{path.relative_to(tmp).as_posix()}", path.read_bytes())
    return f"{store.url}/hf"


def _without_maps(table: Any) -> Any:
    """``table`` with its Arrow map columns (``computation_buckets``) as lists of
    ``{key, value}`` structs, which ``datasets`` has a type for (it has none for maps).
    """
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if not pa.types.is_map(field.type):
            continue
        chunks = [
            pa.ListArray.from_arrays(
                c.offsets,
                pa.StructArray.from_arrays([c.keys, c.items], names=["key", "value"]),
                mask=c.is_null(),
            )
            for c in table.column(i).chunks
        ]
        table = table.set_column(i, field.name, pa.chunked_array(chunks))
    return table


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
                seed=1,
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
        Step(
            labels.domains, lambda p: DomainConfig(enabled=p.classify, keep=tuple(p.keep_domains))
        ),
        Step(labels.ladder, _ladder),
        Step(
            labels.difficulty,
            lambda p: DifficultyConfig(
                enabled=p.ladder and p.difficulty,
                rungs=tuple(r.name for r in p.rungs),
                threshold=p.exit_threshold,
                chunk_size=p.chunk_size,
            ),
        ),
        Step(labels.structure, lambda p: StructureConfig(enabled=p.structure)),
        Step(
            labels.splits,
            lambda p: SplitStageConfig(
                enabled=p.assign_splits, filters=p.filters, split=p.splits, chunk_size=p.chunk_size
            ),
        ),
    ],
    resources=_resources,
    result=CurateResult,
    exports=("curated", *SPLITS, *SIDE_OUTPUTS),
    listed=("curated", *SPLITS, "solve_attempts", "ladder_samples"),
    extra_exports=_exports,
    report=_report,
    stats=_stats,
    summary=_summary,
    ref="mathmill.flows.curate:PIPELINE",
    description="Problems from files, datasets or SQL: normalized, deduplicated, "
    "decontaminated, solved by verified code with repair, leak-checked.",
)
"""load → normalize → dedup (whole) → decontaminate → solve → leaks → exports."""


@pipeline_flow("curate")
async def curate(params: CurateParams) -> CurateResult:
    """Curate problems with reference answers into a set where every problem has code
    that computes its answer in the sandbox.
    """
    return await run_pipeline(PIPELINE, params)
