"""The figures of a run's dataset report, gathered from its run directory (local or
object storage): the manifest (status, params, result: counts, LLM usage, stage
times) and the run's datasets, read a few columns at a time.

Works for every pipeline's output: it goes by record type, not by pipeline, so a
dataset of :class:`~mathmill.records.SolutionRow` (synthesize), tir trajectories
(:class:`~mathmill.records.Attempt` of kind ``tir``), :class:`~mathmill.records.Sample`
(sample, evaluate, critique, curate's ladder), :class:`~mathmill.records.MergedProblem`
(critique), :class:`~mathmill.records.CuratedRow` (curate) and
:class:`~mathmill.records.Dropped` (side outputs) each adds what it knows.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mathmill.errors import StorageError
from mathmill.storage import RunStore

__all__ = ["RunData", "gather"]

# Datasets whose rows are the run's final, curated rows, in order of preference.
_CURATED_FINAL = (("train", "validation", "test"), ("labeled",), ("scored",), ("curated",))
# Dropped side outputs that say why a row failed verification (curate's unsolved).
_FAILURE_SIDE_OUTPUTS = ("unsolved", "leaking")
_PASSED = {"verified", "correct"}


@dataclass
class RunData:
    """What the report shows, all plain numbers and strings."""

    url: str
    pipeline: str
    status: str
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    """Stage names in run order."""
    datasets: dict[str, int] = field(default_factory=dict)
    """Rows written per dataset."""
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """Solution length in tokens, by outcome (verified, correct, wrong_answer, ...)."""
    failures: Counter[str] = field(default_factory=Counter)
    """Why rows failed verification (verdict status or side output reason)."""
    rounds: dict[str, Counter[int]] = field(default_factory=dict)
    """Rewrite/repair rounds by outcome: outcome -> rounds -> rows."""
    pass_rates: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per model: (right, graded)."""
    buckets: Counter[str] = field(default_factory=Counter)
    difficulty: list[float] = field(default_factory=list)
    domains: Counter[str] = field(default_factory=Counter)
    structure: Counter[str] = field(default_factory=Counter)
    tir: list[tuple[int, int, int]] = field(default_factory=list)
    """Per trajectory: (model turns, code executions, code errors)."""


def gather(store: RunStore, manifest: dict[str, Any] | None = None) -> RunData:
    """The report's figures for the run in ``store``; ``manifest`` when the caller has
    it in hand (the end of a run), else ``manifest.json`` is read.
    """
    if manifest is None:
        try:
            manifest = json.loads(store.read_bytes("manifest.json"))
        except StorageError as e:
            raise StorageError(
                f"{store.url}: no manifest.json (not a run directory, or the run has not "
                "finished yet)"
            ) from e
    result: dict[str, Any] = manifest.get("result") or {}
    chunks: dict[str, list[dict[str, Any]]] = manifest.get("chunks") or {}
    data = RunData(
        url=store.url,
        pipeline=str(manifest.get("pipeline") or _pipeline_from_report(store)),
        status=str(manifest.get("status", "unknown")),
        params=manifest.get("params") or {},
        result=result,
        counts={k: int(v) for k, v in (result.get("counts") or {}).items()},
        usage=result.get("usage") or {},
        stages=[str(s) for s in manifest.get("stages") or []] or _stage_order(result),
        datasets={name: sum(int(r.get("rows", 0)) for r in refs) for name, refs in chunks.items()},
    )
    types = {name: refs[0].get("record_type") for name, refs in chunks.items() if refs}
    reader = _Reader(store, chunks)
    for name, record_type in types.items():
        if record_type == "SolutionRow":
            _solutions(data, reader, name)
        elif record_type == "Attempt" and name == "trajectories":
            _trajectories(data, reader, name)
        elif record_type == "Sample" and "merged" not in types:
            _samples(data, reader, name)
        elif record_type == "MergedProblem":
            _merged(data, reader, name)
        elif record_type == "Dropped" and name in _FAILURE_SIDE_OUTPUTS:
            for row in reader.rows(name, ["reason"]):
                data.failures[f"{name}: {row['reason']}"] += 1
    for group in _CURATED_FINAL:
        if any(types.get(name) == "CuratedRow" for name in group):
            for name in group:
                if types.get(name) == "CuratedRow":
                    _curated(data, reader, name)
            break
    else:
        if types.get("problems") == "Problem" and data.pipeline == "evaluate":
            _problem_labels(data, reader, "problems")
    return data


class _Reader:
    """Reads chosen columns of a dataset's chunks, as the manifest lists them."""

    def __init__(self, store: RunStore, chunks: dict[str, list[dict[str, Any]]]) -> None:
        self.store = store
        self.chunks = chunks

    def rows(self, dataset: str, columns: list[str]) -> list[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for ref in self.chunks.get(dataset, []):
            data = self.store.read_bytes(f"{dataset}/{ref['key']}.parquet")
            file = pq.ParquetFile(pa.BufferReader(data))
            present = [c for c in columns if c in file.schema_arrow.names]
            rows += file.read(columns=present).to_pylist()
        return rows


def _stage_order(result: dict[str, Any]) -> list[str]:
    """Stage order for a manifest written before it held one: the counts table's."""
    from mathmill.tasks.export import count_rows

    rows = count_rows(result.get("counts") or {})
    return list(dict.fromkeys(str(r["stage"]) for r in rows))


def _pipeline_from_report(store: RunStore) -> str:
    """The pipeline's name from ``report.md``'s title (``# synthesize run: ...``), for
    run directories written before the manifest named it.
    """
    try:
        first = store.read_bytes("report.md").decode("utf-8", "replace").splitlines()[0]
    except (StorageError, IndexError):
        return "run"
    return first.removeprefix("# ").split(" run:", 1)[0].strip() or "run"


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            loaded = json.loads(value)
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    if isinstance(value, list):  # a map column read as (key, value) pairs
        return dict(value)
    return {}


def _solutions(data: RunData, reader: _Reader, name: str) -> None:
    """synthesize's verified and unverified rows: length, verdict, rounds."""
    for row in reader.rows(name, ["status", "rounds", "completion_tokens"]):
        status = str(row.get("status") or name)
        outcome = "verified" if status == "verified" else "unverified"
        if row.get("completion_tokens"):
            data.lengths.setdefault(status, []).append(int(row["completion_tokens"]))
        if status not in _PASSED:
            data.failures[status] += 1
        data.rounds.setdefault(outcome, Counter())[int(row.get("rounds") or 0)] += 1


def _trajectories(data: RunData, reader: _Reader, name: str) -> None:
    """tir's trajectories: turns, code runs and errors, verdicts, generated tokens."""
    for row in reader.rows(name, ["verdict", "usage", "metadata", "model"]):
        meta = _json(row.get("metadata"))
        verdict = row.get("verdict") or {}
        status = str(verdict.get("status") or "failed")
        tokens = int((row.get("usage") or {}).get("completion_tokens") or 0)
        if tokens:
            data.lengths.setdefault(status, []).append(tokens)
        if status not in _PASSED | {"unvalidated"}:
            data.failures[status] += 1
        if status in {"correct", "incorrect"}:
            right, graded = data.pass_rates.get(str(row.get("model") or "model"), (0, 0))
            data.pass_rates[str(row.get("model") or "model")] = (
                right + (status == "correct"),
                graded + 1,
            )
        data.tir.append(
            (
                int(meta.get("num_turns") or 0),
                int(meta.get("num_code_blocks") or 0),
                int(meta.get("num_code_errors") or 0),
            )
        )


def _samples(data: RunData, reader: _Reader, name: str) -> None:
    """Graded samples: length by status, pass rate by model (a ladder's by rung)."""
    for row in reader.rows(name, ["status", "tokens", "model", "generator", "rung"]):
        status = str(row.get("status") or "unknown")
        if row.get("tokens"):
            data.lengths.setdefault(status, []).append(int(row["tokens"]))
        if status in {"correct", "incorrect", "no_answer", "error"}:
            model = str(row.get("generator") or row.get("model") or "model")
            if row.get("rung"):
                model = f"rung {row['rung']}: {model}"
            right, graded = data.pass_rates.get(model, (0, 0))
            data.pass_rates[model] = (right + (status == "correct"), graded + 1)


def _merged(data: RunData, reader: _Reader, name: str) -> None:
    """critique's merged problems: each model's right/wrong tallies summed."""
    for row in reader.rows(name, ["models"]):
        for model, tally in _json(row.get("models")).items():
            right, wrong = int(tally.get("right") or 0), int(tally.get("wrong") or 0)
            r, g = data.pass_rates.get(str(model), (0, 0))
            data.pass_rates[str(model)] = (r + right, g + right + wrong)
    # the samples' lengths by status (the pass rates come from the tallies above)
    for row in reader.rows("samples", ["status", "tokens"]):
        if row.get("tokens"):
            data.lengths.setdefault(str(row.get("status")), []).append(int(row["tokens"]))


def _curated(data: RunData, reader: _Reader, name: str) -> None:
    """curate's final rows: bucket, difficulty, domain, structure tags, repair rounds."""
    columns = ["bucket", "difficulty", "domain", "structure", "rounds", "completion_tokens"]
    for row in reader.rows(name, columns):
        if row.get("bucket"):
            data.buckets[str(row["bucket"])] += 1
        if row.get("difficulty") is not None:
            data.difficulty.append(float(row["difficulty"]))
        if row.get("domain"):
            data.domains[str(row["domain"])] += 1
        _structure_tags(data, row.get("structure"))
        data.rounds.setdefault("solved", Counter())[int(row.get("rounds") or 0)] += 1
        if row.get("completion_tokens"):
            data.lengths.setdefault("solved", []).append(int(row["completion_tokens"]))


def _problem_labels(data: RunData, reader: _Reader, name: str) -> None:
    """evaluate's input problems: the labels a curated split carried in metadata."""
    for row in reader.rows(name, ["metadata", "domain"]):
        meta = _json(row.get("metadata"))
        if meta.get("bucket"):
            data.buckets[str(meta["bucket"])] += 1
        if isinstance(meta.get("difficulty"), int | float):
            data.difficulty.append(float(meta["difficulty"]))
        domain = meta.get("domain") or row.get("domain")
        if domain:
            data.domains[str(domain)] += 1
        _structure_tags(data, meta.get("structure"))


def _structure_tags(data: RunData, structure: Any) -> None:
    """A structure's tags as evaluate groups them: subdomain, patterns, techniques."""
    if not isinstance(structure, dict):
        return
    if structure.get("subdomain"):
        data.structure[f"subdomain: {structure['subdomain']}"] += 1
    for key in ("reasoning_patterns", "techniques"):
        for value in structure.get(key) or []:
            if isinstance(value, str) and value:
                data.structure[f"{key.split('_')[-1].rstrip('s')}: {value}"] += 1
    if structure.get("case_analysis"):
        data.structure["case analysis"] += 1
    if structure.get("construction"):
        data.structure["construction"] += 1
