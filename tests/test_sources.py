"""Reading problem files: bad rows are reported with their line, good rows kept."""

from __future__ import annotations

from pathlib import Path

from mathmill.records import ErrorInfo, Problem
from mathmill.sources import FieldMap, read_problems_jsonl

DATA = Path(__file__).parent / "data"


def test_real_rows_keep_source_and_license() -> None:
    rows = list(read_problems_jsonl(DATA / "gsm8k_5.jsonl"))
    assert len(rows) == 5
    assert all(isinstance(r, Problem) for r in rows)
    first = rows[0]
    assert isinstance(first, Problem)
    assert first.answer == "18"
    assert first.source_id == "gsm8k-test-0"
    assert first.license == "MIT (c) 2021 OpenAI"
    assert "grade-school-math" in (first.source or "")


def test_malformed_rows_are_reported_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"problem": "1+1?", "answer": 2}\n'
        "{not json\n"
        '{"answer": "3"}\n'
        "\n"
        '["a list"]\n'
        '{"question": "2+2?", "gold": "4", "extra": [1]}\n'
    )
    rows = list(read_problems_jsonl(path))
    errors = [r for r in rows if isinstance(r, ErrorInfo)]
    assert [e.message.split(": ")[0] for e in errors] == [
        f"{path}:2",
        f"{path}:3",
        f"{path}:5",
        f"{path}:6",
    ]
    assert "not JSON" in errors[0].message
    assert "'problem'" in errors[1].message
    good = [r for r in rows if isinstance(r, Problem)]
    assert [(p.statement, p.answer) for p in good] == [("1+1?", "2")]
    mapped = [
        r
        for r in read_problems_jsonl(path, FieldMap(statement="question", answer="gold"))
        if isinstance(r, Problem)
    ]
    assert [(p.statement, p.answer, p.metadata) for p in mapped] == [("2+2?", "4", {"extra": [1]})]
