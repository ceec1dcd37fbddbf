"""Reading problem files: bad rows are reported with their line, good rows kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathmill.errors import ConfigError
from mathmill.records import ErrorInfo, Problem
from mathmill.sources import FieldMap, read_problems, read_problems_jsonl

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


@pytest.mark.parametrize(
    "name",
    [
        "gsm8k_5.jsonl",
        "problems/aime_1983_2024_5.jsonl",
        "problems/amc23_5.jsonl",
        "problems/math500_5.jsonl",
    ],
)
def test_the_shared_problem_sets_read_as_inputs(name: str) -> None:
    items = list(read_problems(str(DATA / name)))
    assert len(items) == 5 and all(isinstance(p, Problem) for p in items)
    for p in items:
        assert isinstance(p, Problem) and p.answer and p.source_id and p.license and p.source


def test_parquet_and_dataset_directory_and_hf_inputs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "gsm8k_5.jsonl").read_text().splitlines()]
    table = pa.Table.from_pylist(
        [{"q": r["problem"], "a": r["answer"], "key": r["id"]} for r in rows]
    )
    pq.write_table(table, tmp_path / "in.parquet")
    fields = FieldMap(statement="q", answer="a", solution=None, source_id="key")
    from_parquet = list(read_problems(str(tmp_path / "in.parquet"), fields, limit=3))
    assert [p.source_id for p in from_parquet] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]  # type: ignore[union-attr]
    # a local dataset directory in the Hub layout (one file per split), streamed by `datasets`
    repo = tmp_path / "repo"
    repo.mkdir()
    pq.write_table(table, repo / "test.parquet")
    pq.write_table(table.slice(0, 2), repo / "train.parquet")
    from_dir = list(read_problems(str(repo), fields, split="train"))
    assert [p.answer for p in from_dir] == ["18", "3"]  # type: ignore[union-attr]
    via_hf = list(read_problems(f"hf:{repo}", fields, split="test", limit=4))
    assert len(via_hf) == 4 and all(isinstance(p, Problem) for p in via_hf)
    with pytest.raises(ConfigError, match=r"cannot open dataset hf:.*nope"):
        list(read_problems(f"hf:{tmp_path / 'nope'}", fields))
    with pytest.raises(ConfigError, match="does not exist"):
        list(read_problems(str(tmp_path / "missing.jsonl")))
