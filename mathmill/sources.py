"""Reading problems from JSONL, Parquet or Hugging Face datasets: one bad row is
reported with where it was, never fatal.

>>> FieldMap().statement
'problem'
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mathmill.errors import ConfigError
from mathmill.records import ErrorInfo, Problem

__all__ = ["MAX_ROW_BYTES", "FieldMap", "decode_utf8", "read_problems", "read_problems_jsonl"]

MAX_ROW_BYTES = 1_000_000
"""A row (a JSONL line, or a row's problem text) above this many bytes is dropped."""


@dataclass(frozen=True)
class FieldMap:
    """Which input fields hold the statement, answer, solution and source id."""

    statement: str = "problem"
    answer: str | None = "answer"
    solution: str | None = "solution"
    source_id: str | None = "id"


def read_problems(
    source: str,
    fields: FieldMap | None = None,
    *,
    split: str = "test",
    limit: int | None = None,
) -> Iterator[Problem | ErrorInfo]:
    """Problems from ``source``: a ``.jsonl`` or ``.parquet`` file, a local dataset
    directory, or ``hf:NAME`` (a Hugging Face dataset, streamed; ``hf:NAME:CONFIG``
    picks a config). At most ``limit`` valid problems; bad rows come as
    :class:`ErrorInfo` naming where they were.
    """
    fields = fields or FieldMap()
    items = _rows(source, fields, split)
    valid = 0
    for item in items:
        if limit is not None and valid >= limit:
            return
        valid += isinstance(item, Problem)
        yield item


def _rows(source: str, fields: FieldMap, split: str) -> Iterator[Problem | ErrorInfo]:
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return _read_hf(name, config or None, split, fields, source)
    path = Path(source)
    if path.is_dir():
        return _read_hf(str(path), None, split, fields, source)
    if not path.is_file():
        raise ConfigError(
            f"input {source!r} does not exist (a file, a dataset directory or hf:NAME)"
        )
    if path.suffix in (".jsonl", ".json"):
        return read_problems_jsonl(path, fields)
    if path.suffix == ".parquet":
        return _read_parquet(path, fields)
    raise ConfigError(f"input {source}: expected .jsonl, .parquet, a dataset directory or hf:NAME")


def read_problems_jsonl(
    path: str | Path, fields: FieldMap | None = None
) -> Iterator[Problem | ErrorInfo]:
    """Yield a :class:`Problem` per valid line and an :class:`ErrorInfo` per bad one.

    The error names the file and line, so a run can keep going and report the bad
    rows at the end.
    """
    fields = fields or FieldMap()
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_ROW_BYTES:
                yield _oversized(where, len(raw))
                continue
            line = decode_utf8(raw, where)
            if isinstance(line, ErrorInfo):
                yield line
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield ErrorInfo(kind="malformed_row", message=f"{where}: not JSON: {e.msg}")
                continue
            yield problem_from_row(row, fields, where, path.name)


def decode_utf8(raw: bytes, where: str, what: str = "") -> str | ErrorInfo:
    """``raw`` as text, or the malformed-row error naming ``where`` (and ``what``, e.g.
    ``"column 'problem' is "``) and the first byte that is not UTF-8.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1]
        return ErrorInfo(
            kind="malformed_row",
            message=f"{where}: {what}not UTF-8 (byte {e.start + 1}: {bad!r})",
        )


def _oversized(where: str, size: int) -> ErrorInfo:
    return ErrorInfo(
        kind="oversized_row",
        message=f"{where}: {size:,} bytes, over the limit of {MAX_ROW_BYTES:,}",
    )


def _read_parquet(path: Path, fields: FieldMap) -> Iterator[Problem | ErrorInfo]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"input {path} is not valid Parquet: {e}") from e
    index = 0
    for batch in file.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield problem_from_row(row, fields, f"{path}#row{index}", path.name)


def pyarrow_knows_pandas() -> None:
    """Let pyarrow convert pandas objects again (pandas imported now) after
    :func:`mathmill.flows.cli.skip_pyarrow_pandas_probe`: HF datasets hands it some.
    """
    import pyarrow as pa

    pa.lib._pandas_api.pd  # noqa: B018  (the property imports pandas and turns it on)


def _read_hf(
    name: str, config: str | None, split: str, fields: FieldMap, source: str
) -> Iterator[Problem | ErrorInfo]:
    import datasets

    pyarrow_knows_pandas()
    try:
        stream: Iterable[dict[str, Any]] = datasets.load_dataset(
            name, config, split=split, streaming=True
        )
    except Exception as e:  # datasets raises many kinds (not found, offline, bad split)
        raise ConfigError(f"cannot open dataset {source} (split {split!r}): {e}") from e
    for index, row in enumerate(stream):
        yield problem_from_row(row, fields, f"{source}[{split}]#{index}", source)


def problem_from_row(row: Any, fields: FieldMap, where: str, source: str) -> Problem | ErrorInfo:
    """A :class:`Problem` from one input row, or the reason it is not one (no or
    empty problem text, text that is not a string, an answer that is neither text nor a
    number, a problem over :data:`MAX_ROW_BYTES`). A missing, empty, NaN or infinite
    answer means no reference answer.
    """
    if not isinstance(row, dict):
        return ErrorInfo(
            kind="malformed_row", message=f"{where}: not an object ({type(row).__name__})"
        )
    statement = row.get(fields.statement)
    if statement is not None and not isinstance(statement, str):
        return ErrorInfo(
            kind="malformed_row",
            message=f"{where}: field {fields.statement!r} must be text, "
            f"not {type(statement).__name__}",
        )
    if not (statement or "").strip():
        return ErrorInfo(kind="malformed_row", message=f"{where}: no {fields.statement!r} field")
    assert isinstance(statement, str)
    if len(statement.encode("utf-8", "replace")) > MAX_ROW_BYTES:
        return _oversized(where, len(statement.encode("utf-8", "replace")))
    for name in (fields.answer, fields.solution, fields.source_id):
        value = row.get(name) if name else None
        if value is not None and not isinstance(value, str | int | float):
            return ErrorInfo(
                kind="malformed_row",
                message=f"{where}: field {name!r} must be text or a number, "
                f"not {type(value).__name__}",
            )
    known = {
        fields.statement,
        fields.answer,
        fields.solution,
        fields.source_id,
        "source",
        "license",
    }
    extras = {k: v for k, v in row.items() if k not in known}
    try:
        return Problem(
            statement=statement,
            answer=_opt(row, fields.answer),
            solution=_opt(row, fields.solution),
            source_id=_opt(row, fields.source_id),
            source=_opt(row, "source") or source,
            license=_opt(row, "license"),
            metadata=json.loads(json.dumps(extras, default=str)),
        )
    except (ValidationError, ValueError) as e:
        detail = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        return ErrorInfo(kind="malformed_row", message=f"{where}: {detail}")


def _opt(row: dict[str, object], name: str | None) -> str | None:
    """The field as text; None when missing, empty, NaN or infinite."""
    if name is None:
        return None
    value = row.get(name)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    text = str(value)
    return text if text.strip() else None
