"""A run directory's verified rows, whatever pipeline wrote them, as :class:`Example`.

The pipeline is read from the run's ``manifest.json`` (the datasets it lists), and only
the chunks the manifest lists are read, each verified against its SHA-256, through
:class:`~mathmill.storage.RunStore` (a local path or ``s3://``):

============  ==================================  ==========================================
pipeline      rows read                           kept (verified)
============  ==================================  ==========================================
synthesize    ``verified`` (SolutionRow)          ``status == "verified"``
curate        ``train``/``validation``/``test``   every row (they passed the filters); the
              (CuratedRow), else ``curated``      run's split kept
tir           ``trajectories`` (Attempt)          ``verdict == "correct"``
sample,       ``samples`` (Sample)                ``status == "correct"``
evaluate
critique      ``critiques`` (CritiqueExample)     every example (verl); SFT formats: the
                                                  ones with a teacher critique
============  ==================================  ==========================================

>>> e = Example(id="a", split="train", data_source="d", problem="1+1?", answer="2",
...             turns=[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}])
>>> [t["role"] for t in e.turns], e.sft
(['user', 'assistant'], True)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mathmill.errors import ConfigError, StorageError
from mathmill.records import (
    Attempt,
    CritiqueExample,
    CuratedRow,
    Problem,
    Sample,
    SolutionRow,
)
from mathmill.storage import ChunkRef, RunStore, StorageConfig

__all__ = ["PIPELINES", "SPLITS", "Example", "RunRows", "detect_pipeline", "read_run"]

SPLITS = ("train", "validation", "test")
PIPELINES = ("synthesize", "curate", "tir", "sample", "evaluate", "critique")


@dataclass
class Example:
    """One exportable row: the problem, the verified solution as chat turns
    (``{"role", "content"}``, roles system / user / assistant / tool; tir's tool turns
    in its Pythonformer text), the ground truth for RL, and where it came from.
    """

    id: str
    split: str
    data_source: str
    problem: str
    answer: str | None
    turns: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    verl: dict[str, Any] | None = None
    """A ready verl row (critique's own layout), else built from the fields above."""
    sft: bool = True
    """Whether ``turns`` end in a solution to train on (a critique example without a
    teacher critique has none)."""


@dataclass
class RunRows:
    """What :func:`read_run` found: the pipeline, the kept examples, and the filters."""

    pipeline: str
    source: str
    status: str
    examples: list[Example]
    read: int
    skipped: Counter[str]
    filters: list[str]
    splits: list[str]
    """The run's own splits (curate's), in order; empty when it has none."""


KNOWN_PIPELINES = ("synthesize", "tir", "sample", "evaluate", "curate", "critique")


def detect_pipeline(manifest: dict[str, Any]) -> str:
    """The pipeline that wrote a run: its manifest's ``pipeline`` (runs since the dataset
    report), else guessed from its datasets (and params).

    >>> detect_pipeline({"pipeline": "evaluate", "chunks": {"samples": []}})
    'evaluate'
    >>> detect_pipeline({"chunks": {"trajectories": [], "problems": []}})
    'tir'
    >>> detect_pipeline({"chunks": {"samples": []}, "params": {"top_p": 1.0}})
    'sample'
    """
    named = manifest.get("pipeline")
    if isinstance(named, str) and named in KNOWN_PIPELINES:
        return named
    names = set(manifest.get("chunks") or {})
    params = _params(manifest)
    if names & {"critiques", "merged", "examples"}:
        return "critique"
    if "trajectories" in names:
        return "tir"
    if names & {"curated", "solved", "labeled", *SPLITS}:
        return "curate"
    if names & {"verified", "unverified", "cots"}:
        return "synthesize"
    if "samples" in names:
        return "sample" if "top_p" in params else "evaluate"
    listed = ", ".join(sorted(names)) or "none"
    raise ConfigError(f"cannot tell which pipeline wrote this run (datasets: {listed})")


def _params(manifest: dict[str, Any]) -> dict[str, Any]:
    params = manifest.get("params") or manifest.get("config") or {}
    return params if isinstance(params, dict) else {}


def read_manifest(store: RunStore) -> dict[str, Any]:
    """The run's ``manifest.json``; a clear error when it is not a finished run."""
    try:
        data = store.read_bytes("manifest.json")
    except StorageError as e:
        raise ConfigError(
            f"{store.url} has no manifest.json: not a run directory, or the run never finished"
        ) from e
    manifest = json.loads(data)
    if not isinstance(manifest, dict):
        raise ConfigError(f"{store.url}/manifest.json: expected a JSON object")
    return manifest


def read_run(
    run: str | StorageConfig, *, allow_incomplete: bool = False, pipeline: str | None = None
) -> RunRows:
    """Read a run directory's verified rows. An incomplete run (chunks failed) is refused
    unless ``allow_incomplete``: its finished chunks are then exported.
    """
    store = RunStore(run)
    manifest = read_manifest(store)
    status = str(manifest.get("status", "unknown"))
    if status != "complete" and not allow_incomplete:
        raise ConfigError(
            f"{store.url}: the run is {status}; finish it (re-run the same command) or "
            "pass --allow-incomplete to export what finished"
        )
    kind = pipeline or detect_pipeline(manifest)
    if kind not in PIPELINES:
        raise ConfigError(f"unknown pipeline {kind!r}: one of {', '.join(PIPELINES)}")
    reader = _Reader(store, manifest)
    out = RunRows(kind, store.url, status, [], 0, Counter(), [], [])
    {
        "synthesize": _synthesize,
        "curate": _curate,
        "tir": _tir,
        "sample": _sample,
        "evaluate": _sample,
        "critique": _critique,
    }[kind](reader, out)
    return out


class _Reader:
    """The chunks a manifest lists, read and verified."""

    def __init__(self, store: RunStore, manifest: dict[str, Any]) -> None:
        self.store = store
        self.manifest = manifest
        self.params = _params(manifest)
        self.chunks: dict[str, list[dict[str, Any]]] = manifest.get("chunks") or {}

    def has(self, dataset: str) -> bool:
        return bool(self.chunks.get(dataset))

    def rows(self, dataset: str, model: type[Any]) -> Iterator[Any]:
        refs = sorted(
            (ChunkRef.model_validate(r) for r in self.chunks.get(dataset, [])),
            key=lambda r: r.key,
        )
        for ref in refs:
            yield from self.store.dataset(dataset).read_chunk(ref, model)


def _str(value: object) -> str:
    return "" if value is None else str(value)


def _synthesize(r: _Reader, out: RunRows) -> None:
    out.filters = ["dataset verified", "status == verified"]
    unverified = sum(int(ref.get("rows", 0)) for ref in r.chunks.get("unverified", []))
    if unverified:  # the side output: counted, never read
        out.read += unverified
        out.skipped["unverified"] += unverified
    for row in r.rows("verified", SolutionRow):
        out.read += 1
        if row.status != "verified":
            out.skipped[f"status {row.status}"] += 1
            continue
        answer = row.final_answer or row.computed_answer
        out.examples.append(
            Example(
                id=row.id,
                split="train",
                data_source="mathmill/synthesize",
                problem=row.problem,
                answer=answer,
                turns=_qa(row.problem, row.solution),
                metadata={
                    "problem_id": row.problem_id,
                    "cot_type": row.cot_type,
                    "topic": _str(row.topic),
                    "domain": _str(row.domain),
                    "final_answer": _str(row.final_answer),
                    "computed_answer": _str(row.computed_answer),
                    "code": _str(row.code),
                    "rounds": row.rounds,
                    "model": _str(row.model),
                },
            )
        )


def _curate(r: _Reader, out: RunRows) -> None:
    splits = [s for s in SPLITS if r.has(s)]
    out.splits = splits if r.params.get("assign_splits", True) is not False else []
    datasets = splits or ["curated"]
    out.filters = [f"datasets {', '.join(datasets)}", "every row (curated: solved, leak-checked)"]
    for name in datasets:
        for row in r.rows(name, CuratedRow):
            out.read += 1
            out.examples.append(
                Example(
                    id=row.id,
                    split=row.split or (name if name in SPLITS else "train"),
                    data_source=row.source or "mathmill/curate",
                    problem=row.problem,
                    answer=row.answer,
                    turns=_qa(row.problem, program_solution(row)),
                    metadata={
                        "source": _str(row.source),
                        "source_id": _str(row.source_id),
                        "code": row.code,
                        "computed_answer": _str(row.computed_answer),
                        "domain": _str(row.domain),
                        "cluster_id": _str(row.cluster_id),
                        "bucket": _str(row.bucket),
                        "difficulty": row.difficulty,
                        "rounds": row.rounds,
                        "leak_verdict": row.leak_verdict,
                        "model": _str(row.model),
                    },
                )
            )


def program_solution(row: CuratedRow) -> str:
    """A curated row's solution as the assistant's reply: its program, then the answer.

    >>> from mathmill.records import CuratedRow
    >>> print(program_solution(CuratedRow(id="x", problem="p", original_problem="p",
    ...     answer="4", original_answer="4", code="print(2 + 2)")))
    ```python
    print(2 + 2)
    ```
    The program prints 4, so the answer is $\\boxed{4}$.
    """
    printed = row.computed_answer or row.answer
    return (
        f"```python\n{row.code.strip()}\n```\n"
        f"The program prints {printed}, so the answer is $\\boxed{{{row.answer}}}$."
    )


def _tir(r: _Reader, out: RunRows) -> None:
    from mathmill.tasks.tir_export import conversation_id, export_metadata

    out.filters = ["dataset trajectories", "verdict == correct"]
    problems = {p.id: p for p in r.rows("problems", Problem)}
    samples = int(r.params.get("samples", 1) or 1)
    for a in r.rows("trajectories", Attempt):
        out.read += 1
        status = a.verdict.status if a.verdict else "none"
        if status != "correct":
            out.skipped[f"verdict {status}"] += 1
            continue
        p = problems.get(a.problem_id)
        if p is None:
            out.skipped["problem missing"] += 1
            continue
        out.examples.append(
            Example(
                id=conversation_id(p, a, samples),
                split="train",
                data_source=p.source or "mathmill/tir",
                problem=p.statement,
                answer=p.answer,
                turns=[{"role": t.role, "content": t.content} for t in a.turns],
                metadata=export_metadata(p, a),
            )
        )


def _sample(r: _Reader, out: RunRows) -> None:
    out.filters = ["dataset samples", "status == correct"]
    for s in r.rows("samples", Sample):
        out.read += 1
        if s.status != "correct":
            out.skipped[f"status {s.status}"] += 1
            continue
        out.examples.append(
            Example(
                id=s.id,
                split="train",
                data_source=f"mathmill/{out.pipeline}",
                problem=s.problem,
                answer=s.reference,
                turns=_qa(s.problem, s.text),
                metadata={
                    "problem_id": s.problem_id,
                    "index": s.index,
                    "final_answer": _str(s.final_answer),
                    "model": s.model,
                    "generator": _str(s.generator),
                    "tokens": s.tokens,
                    "logprob_mean": s.logprob_mean,
                    "finish_reason": _str(s.finish_reason),
                },
            )
        )


def _critique(r: _Reader, out: RunRows) -> None:
    from mathmill.tasks.critique import verl_row

    out.filters = [
        "dataset critiques",
        "verl: every example; trl/sharegpt/hf: examples with a teacher critique",
    ]
    rows: list[CritiqueExample] = sorted(
        r.rows("critiques", CritiqueExample), key=lambda e: e.position
    )
    for i, e in enumerate(rows):
        out.read += 1
        turns = [{"role": "user", "content": e.prompt}]
        if e.critique is not None:
            turns.append({"role": "assistant", "content": e.critique})
        out.examples.append(
            Example(
                id=e.id,
                split="train",
                data_source=e.data_source,
                problem=e.prompt,
                answer=e.target,
                turns=turns,
                metadata={
                    "target": e.target,
                    "problem_id": e.problem_id,
                    "sample_id": e.sample_id,
                    "model": e.model,
                    "teacher_model": _str(e.teacher_model),
                },
                verl=verl_row(e, i),
                sft=e.critique is not None,
            )
        )


def _qa(problem: str, solution: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
