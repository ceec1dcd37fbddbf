"""Reading problems from files: one bad row is reported with its line, never fatal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from mathmill.records import ErrorInfo, Problem

__all__ = ["FieldMap", "read_problems_jsonl"]


@dataclass(frozen=True)
class FieldMap:
    """Which input fields hold the statement, answer, solution and source id."""

    statement: str = "problem"
    answer: str | None = "answer"
    solution: str | None = "solution"
    source_id: str | None = "id"


def read_problems_jsonl(
    path: str | Path, fields: FieldMap | None = None
) -> Iterator[Problem | ErrorInfo]:
    """Yield a :class:`Problem` per valid line and an :class:`ErrorInfo` per bad one.

    The error names the file and line, so a run can keep going and report the bad
    rows at the end.
    """
    fields = fields or FieldMap()
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield ErrorInfo(kind="malformed_row", message=f"{where}: not JSON: {e.msg}")
                continue
            if not isinstance(row, dict) or not str(row.get(fields.statement) or "").strip():
                yield ErrorInfo(
                    kind="malformed_row", message=f"{where}: no {fields.statement!r} field"
                )
                continue
            extras = {
                k: v
                for k, v in row.items()
                if k not in {fields.statement, fields.answer, fields.solution, fields.source_id}
                and k not in {"source", "license"}
            }
            try:
                yield Problem(
                    statement=str(row[fields.statement]),
                    answer=_opt(row, fields.answer),
                    solution=_opt(row, fields.solution),
                    source_id=_opt(row, fields.source_id),
                    source=_opt(row, "source") or str(path.name),
                    license=_opt(row, "license"),
                    metadata=extras,
                )
            except ValidationError as e:
                yield ErrorInfo(kind="malformed_row", message=f"{where}: {e.errors()[0]['msg']}")


def _opt(row: dict[str, object], name: str | None) -> str | None:
    if name is None or row.get(name) is None:
        return None
    return str(row[name])
