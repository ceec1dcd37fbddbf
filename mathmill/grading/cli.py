"""The ``mathmill grade`` command's work: one pair, or a JSONL file of pairs."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from mathmill.errors import ConfigError
from mathmill.grading.equivalence import GradeResult, grade

__all__ = ["grade_file", "grade_pair", "grade_rows"]


def grade_pair(gold: str, pred: str, *, timeout_s: float = 5.0) -> GradeResult:
    """Grade one pair."""
    return grade(gold, pred, timeout_s=timeout_s)


def grade_rows(lines: TextIO, *, timeout_s: float = 5.0) -> Iterator[dict[str, Any]]:
    """One output object per non-blank input line: the row's fields plus the verdict.

    A line that is not a JSON object with ``gold`` and ``pred`` gets
    ``equivalent: false`` and the reason, never an exception. An optional ``problem``
    (its option list) or ``options`` (``{"A": "10", ...}``) grades letters against
    option texts.
    """
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield {
                "line": lineno,
                "equivalent": False,
                "status": "unparseable",
                "rule": "input",
                "reason": f"line {lineno} is not JSON: {e.msg}",
            }
            continue
        if not isinstance(row, dict) or "gold" not in row or "pred" not in row:
            base = row if isinstance(row, dict) else {"row": row}
            yield {
                **base,
                "line": lineno,
                "equivalent": False,
                "status": "unparseable",
                "rule": "input",
                "reason": f"line {lineno} needs 'gold' and 'pred' fields",
            }
            continue
        problem, options = row.get("problem"), row.get("options")
        result = grade(
            row["gold"],
            row["pred"],
            problem=problem if isinstance(problem, str) else None,
            options={str(k): str(v) for k, v in options.items()}
            if isinstance(options, dict)
            else None,
            timeout_s=timeout_s,
        )
        yield {
            **row,
            "equivalent": result.equivalent,
            "status": result.status,
            "rule": result.rule,
            "reason": result.reason,
        }


def grade_file(path: str, *, timeout_s: float = 5.0, out: TextIO | None = None) -> int:
    """Grade a JSONL file (``-`` for stdin) to ``out`` (stdout); returns the exit code."""
    out = out or sys.stdout
    try:
        stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    try:
        for obj in grade_rows(stream, timeout_s=timeout_s):
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    finally:
        if stream is not sys.stdin:
            stream.close()
    return 0
