"""The curate pipeline end to end on a real Prefect server, the real sandbox and real
Parquet, against a fake OpenAI server scripted per problem (tests/curate_world.py):
every input row ends in the curated set or in a side output with the right reason.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mathmill.flows.curate import CurateParams, CurateResult, curate
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import CuratedRow
from tests.curate_world import (
    _PROBLEM,
    OUTCOME,
    CurateWorld,
    Planted,
    key,
    planted_input,
    write_jsonl,
)
from tests.postgres_support import Postgres, postgres  # noqa: F401  (a session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def config(base_url: str, data: Path, out: Path, **extra: Any) -> CurateParams:
    fields: dict[str, Any] = {
        "input": str(data),
        "out": str(out),
        "benchmarks": ["math500", "amc23", "aime"],  # the input is GSM8K itself
        "chunk_size": 8,
        "concurrency": 8,
        "solver": {"base_url": base_url, "model": "fake", "max_retries": 0},
        "sandbox": {"timeout_s": 1.5, "workers": 2},
    }
    return CurateParams.model_validate(fields | extra)


def run_flow(cfg: CurateParams) -> CurateResult:
    result: CurateResult = asyncio.run(curate(params=cfg))
    return result


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@dataclass
class Run:
    world: CurateWorld
    planted: Planted
    data: Path
    out: Path
    result: CurateResult
    answered: int
    base_url: str


@pytest.fixture(scope="module")
def run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    planted = planted_input()
    tmp = tmp_path_factory.mktemp("curate")
    data = write_jsonl(tmp / "in.jsonl", planted.rows)
    world = CurateWorld(planted.kinds)
    with FakeOpenAIServer(world) as fake:
        result = run_flow(config(fake.base_url, data, tmp / "run"))
        yield Run(world, planted, data, tmp / "run", result, world.answered, fake.base_url)


def outcomes(out: Path) -> dict[str, tuple[str, str]]:
    """Input id -> (where it ended, reason) over the curated set and side outputs."""
    ids: dict[str, tuple[str, str]] = {}
    for row in jsonl(out / "curated.jsonl"):
        ids[row["source_id"] or row["id"]] = ("curated", row["leak_verdict"])
    for name in ("dropped", "duplicates", "contaminated", "unsolved", "leaking"):
        for d in jsonl(out / f"{name}.jsonl"):
            record = d["record"]
            source_id = record.get("source_id") if isinstance(record, dict) else None
            ids[str(source_id or d["target_id"])] = (name, d["reason"])
    return ids


def test_every_row_is_accounted_for_with_its_reason(run: Run) -> None:
    got = outcomes(run.out)
    expected = run.planted.expected
    # the two malformed rows are named by where they were (file:line), not by id
    malformed = [v for k, v in got.items() if k not in expected]
    assert sorted(malformed) == [("dropped", "malformed_row")] * 2
    assert {k: v for k, v in got.items() if k in expected} == expected
    # read: the problems the load stage passed on (not the 2 malformed rows, not the copy)
    assert run.result.read == len(run.planted.rows) - 3
    assert run.result.dropped == 3
    assert (
        run.result.curated
        + run.result.duplicates
        + run.result.contaminated
        + (run.result.unsolved + run.result.leaking)
        == run.result.read
    )


def test_curated_rows_keep_code_lineage_and_originals(run: Run) -> None:
    rows = [CuratedRow.model_validate(r) for r in jsonl(run.out / "curated.jsonl")]
    kinds = run.planted.kind_of
    for row in rows:
        kind = kinds[str(row.source_id)]
        place, verdict, rounds = OUTCOME[kind]
        assert (place, row.leak_verdict, row.rounds) == (place, verdict, rounds), kind
        assert row.code and "print" in row.code
        assert row.computed_answer is not None and row.answer == row.original_answer
        assert len(row.lineage) == row.rounds + 1
        assert row.cluster_id is not None
        assert row.original_problem.strip() and row.problem
    attempts = [json.loads(line) for line in _dataset_jsonl(run.out, "solve_attempts")]
    by_id = {a["id"]: a for a in attempts}
    twofix = next(r for r in rows if kinds[str(r.source_id)] == "twofix")
    statuses = [by_id[i]["verdict"]["status"] for i in twofix.lineage]
    assert statuses == ["error", "wrong_answer", "verified"]
    assert by_id[twofix.lineage[1]]["parent_id"] == twofix.lineage[0]


def _dataset_jsonl(out: Path, name: str) -> list[str]:
    from mathmill.codec import to_json_lines
    from mathmill.records import RECORD_TYPES
    from mathmill.storage import RunStore

    store = RunStore(str(out))
    lines: list[str] = []
    for ref in store.dataset(name).refs():
        table = store.dataset(name).read_table(ref)
        lines += [b.decode() for b in to_json_lines(table, RECORD_TYPES[ref.record_type])]
    return lines


def test_repair_feedback_says_what_failed_without_the_answer(run: Run) -> None:
    repairs = [text for stage, text in run.world.prompts if stage == "solve.repair"]
    assert any("did not finish within 1.5 s" in t for t in repairs)
    assert any("ZeroDivisionError" in t for t in repairs)
    assert any("printed nothing" in t for t in repairs)
    assert any("no ```python code block" in t for t in repairs)
    assert any("which is not the right answer" in t for t in repairs)
    for text in repairs:  # the feedback never gives the reference answer away
        _, answer = run.planted.kinds[_key_of_prompt(text)]
        feedback = text.split("What happened:", 1)[1].split("Reply with", 1)[0]
        assert not re.search(rf"(?<![\d.]){answer}(?![\d.])", feedback), feedback


def _key_of_prompt(text: str) -> str:
    m = _PROBLEM.search(text)
    assert m
    return key(m.group(1))


def test_side_outputs_name_what_they_matched(run: Run) -> None:
    dups = {d["target_id"]: d for d in jsonl(run.out / "duplicates.jsonl")}
    assert sorted(d["reason"] for d in dups.values()) == ["duplicate", "near_duplicate"]
    assert all("same cluster as" in d["detail"] for d in dups.values())
    contaminated = {d["record"]["source_id"]: d for d in jsonl(run.out / "contaminated.jsonl")}
    assert set(contaminated) == {"bench-aime", "bench-math500", "bench-amc"}
    assert "aime" in contaminated["bench-aime"]["detail"]
    assert "math500" in contaminated["bench-math500"]["detail"]
    match = contaminated["bench-aime"]["record"]["metadata"]["contamination"]
    assert match["item_id"] == "1983-AIME-1"
    leaking = jsonl(run.out / "leaking.jsonl")
    assert len(leaking) == 2 and all(d["reason"] == "leak" for d in leaking)


def test_exports_load_with_the_consumers_loaders(run: Run) -> None:
    import datasets
    import pyarrow.parquet as pq

    curated = jsonl(run.out / "curated.jsonl")
    table = pq.read_table(run.out / "curated.parquet")
    assert table.num_rows == len(curated) == run.result.curated
    ds = datasets.load_from_disk(str(run.out / "hf"))  # the splits, as a DatasetDict
    assert set(ds) == {"train", "validation", "test"}
    assert sorted(i for part in ds.values() for i in part["id"]) == sorted(r["id"] for r in curated)
    for name, part in ds.items():
        assert pq.read_table(run.out / f"{name}.parquet").num_rows == len(part)


def test_rerun_reuses_everything_and_pays_nothing(run: Run) -> None:
    before = run.world.answered
    with FakeOpenAIServer(run.world) as fake:
        again = run_flow(config(fake.base_url, run.data, run.out))
    assert run.world.answered == before
    assert again.curated == run.result.curated
    assert run.world.paid_twice() == {}


def fill_table(url: str, rows: list[object]) -> None:
    """Table ``problems`` (id, problem, answer) holding the planted rows whose problem is
    text (a database column has one type: the malformed JSONL rows have no place in it).
    """
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = sa.Table(
        "problems", metadata, *(sa.Column(c, sa.Text) for c in ("id", "problem", "answer"))
    )
    good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("problem"), str)]
    with engine.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        conn.execute(
            table.insert(),
            [{"id": r["id"], "problem": r["problem"], "answer": r.get("answer")} for r in good],
        )
    engine.dispose()


def curated_and_side(out: Path) -> dict[str, list[tuple[str, ...]]]:
    got = {
        "curated": sorted(
            (r["id"], r["source_id"], r["code"], r["leak_verdict"])
            for r in jsonl(out / "curated.jsonl")
        )
    }
    for name in ("duplicates", "contaminated", "unsolved", "leaking", "dropped"):
        got[name] = sorted((d["target_id"], d["reason"]) for d in jsonl(out / f"{name}.jsonl"))
    return got


def test_postgres_and_sqlite_give_the_same_rows(
    prefect_api: dict[str, str],
    postgres: Postgres,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.engine import URL

    planted = planted_input(per_kind=1)
    postgres.create_database("curate")
    admin = URL.create(
        "postgresql+psycopg",
        username=postgres.user,
        password=postgres.password,
        host=postgres.host,
        port=postgres.port,
        database="curate",
    )
    fill_table(admin.render_as_string(hide_password=False), planted.rows)
    sqlite = f"sqlite:///{tmp_path / 'problems.db'}"
    fill_table(sqlite, planted.rows)
    monkeypatch.setenv("CURATE_PG_PASSWORD", postgres.password)
    pg = f"postgresql+psycopg://{postgres.user}@{postgres.host}:{postgres.port}/curate"
    world = CurateWorld(planted.kinds)
    results = {}
    with FakeOpenAIServer(world) as fake:
        for name, url, extra in (
            ("sqlite", sqlite, {}),
            ("postgres", pg, {"sql_password_env": "CURATE_PG_PASSWORD"}),
        ):
            cfg = config(fake.base_url, tmp_path, tmp_path / name).model_copy(
                update={"input": "", "sql_url": url, "table": "problems", **extra}
            )
            CurateParams.model_validate(cfg.model_dump())  # still valid as a whole
            results[name] = run_flow(cfg)
    sqlite_rows, pg_rows = (
        curated_and_side(tmp_path / "sqlite"),
        curated_and_side(tmp_path / "postgres"),
    )
    assert sqlite_rows == pg_rows
    assert len(sqlite_rows["curated"]) == results["sqlite"].curated > 0
    assert {r[1] for r in sqlite_rows["curated"]} <= set(planted.expected)
    manifest = (tmp_path / "postgres" / "manifest.json").read_text()
    assert postgres.password not in manifest


def test_pass_at_k_keeps_every_sample(prefect_api: dict[str, str], tmp_path: Path) -> None:
    planted = planted_input(per_kind=1)
    data = write_jsonl(tmp_path / "in.jsonl", planted.rows)
    world = CurateWorld(planted.kinds)
    with FakeOpenAIServer(world) as fake:
        result = run_flow(config(fake.base_url, data, tmp_path / "run", samples=2, seed=5))
    rows = {r["source_id"]: r for r in jsonl(tmp_path / "run" / "curated.jsonl")}
    assert result.curated == len(rows) > 0
    assert all(r["samples"] == 2 and r["samples_solved"] == 2 for r in rows.values())
    attempts = [json.loads(line) for line in _dataset_jsonl(tmp_path / "run", "solve_attempts")]
    seeds = {(a["sample_index"], a["sampling"]["seed"]) for a in attempts}
    assert seeds == {(0, 5), (1, 6)}  # two independent samples per problem, each seeded
    unsolved = {d["record"]["source_id"]: d for d in jsonl(tmp_path / "run" / "unsolved.jsonl")}
    never = next(i for i, k in planted.kind_of.items() if k == "never")
    assert unsolved[never]["reason"] == "wrong_answer"
    tried = [a for a in attempts if a["problem_id"] == unsolved[never]["target_id"]]
    assert sorted({a["sample_index"] for a in tried}) == [0, 1] and len(tried) == 6


def test_endpoint_down_mid_solve_keeps_rows_and_resumes(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.errors import IncompleteRun

    planted = planted_input(per_kind=1)
    data = write_jsonl(tmp_path / "in.jsonl", planted.rows)
    world = CurateWorld(planted.kinds, failing={"solve.repair"})  # first tries work
    with FakeOpenAIServer(world) as fake:
        cfg = config(fake.base_url, data, tmp_path / "run")
        with pytest.raises(IncompleteRun, match="re-run the same command to resume"):
            run_flow(cfg)
        first_tries = world.stages["solve.code"]
        assert first_tries > 0 and world.stages["solve.repair"] == 0  # 503s are not answers
        world.failing.clear()
        result = run_flow(cfg)
        with FakeOpenAIServer(CurateWorld(planted.kinds)) as other:
            whole = run_flow(config(other.base_url, data, tmp_path / "whole"))
    assert world.paid_twice() == {}  # the first tries were replayed, not paid again
    assert world.stages["solve.code"] == first_tries
    assert curated_and_side(tmp_path / "run") == curated_and_side(tmp_path / "whole")
    assert result.curated == whole.curated > 0
