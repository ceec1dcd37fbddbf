"""curate's label stages end to end (difficulty ladder with early exit, Rasch
difficulty, heuristic domain, structure, filters and splits) and the evaluate flow, on
a real Prefect server and the real sandbox, against the fake server playing three
models of different skill, scripted per problem (tests/curate_world.py).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mathmill.flows.curate import CurateParams, CurateResult, curate
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import CuratedRow
from tests.curate_world import CurateWorld, key, planted_input, write_jsonl
from tests.resume_support import run_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUNGS = ("small", "medium", "large")
SAMPLES = 2
# three models (the fake server answers by the stage's rung; distinct names, distinct calls)
RUNG_MODELS = [{"name": r, "model": {"model": f"fake-{r}"}} for r in RUNGS]


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@dataclass
class Run:
    world: CurateWorld
    out: Path
    result: CurateResult
    level: dict[str, int]  # source id -> first solving rung (3: none)


def _levels(planted: Any) -> tuple[dict[str, int], dict[str, int]]:
    """A planted ladder level per GSM8K problem: 0, 1, 2 or 3 (no rung solves it)."""
    by_key: dict[str, int] = {}
    by_id: dict[str, int] = {}
    for i, row in enumerate(r for r in planted.rows if str(r.get("id", "")).startswith("gsm8k")):
        by_key[key(str(row["problem"]))] = by_id[str(row["id"])] = i % 4
    return by_key, by_id


@pytest.fixture(scope="module")
def run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    planted = planted_input(per_kind=2)
    tmp = tmp_path_factory.mktemp("labels")
    data = write_jsonl(tmp / "in.jsonl", planted.rows)
    by_key, by_id = _levels(planted)
    world = CurateWorld(planted.kinds, rungs=RUNGS, levels=by_key)
    params = CurateParams.model_validate(
        {
            "input": str(data),
            "out": str(tmp / "run"),
            "benchmarks": ["math500", "amc23", "aime"],
            "chunk_size": 6,
            "solver": {"base_url": "http://unused.invalid/v1", "model": "fake", "max_retries": 0},
            "sandbox": {"timeout_s": 1.5, "workers": 2},
            "rungs": RUNG_MODELS,
            "ladder_samples": SAMPLES,
            "filters": {"drop_unsolved": False},
            "splits": {"train": 0.5, "validation": 0.25, "test": 0.25},
        }
    )
    with FakeOpenAIServer(world) as fake:
        solver = {"base_url": fake.base_url, "model": "fake", "max_retries": 0}
        params = params.model_copy(update={"solver": type(params.solver)(**solver)})
        result: CurateResult = asyncio.run(curate(params=params))
    return Run(world, tmp / "run", result, by_id)


def labelled(run: Run) -> list[CuratedRow]:
    rows = [
        CuratedRow.model_validate(r)
        for s in ("train", "validation", "test")
        for r in jsonl(run.out / f"{s}.jsonl")
    ]
    return rows + [
        CuratedRow.model_validate(d["record"]) for d in jsonl(run.out / "filtered.jsonl")
    ]


def test_early_exit_sends_each_problem_exactly_as_far_as_it_needs(run: Run) -> None:
    rows = labelled(run)
    assert len(rows) == run.result.curated > 0
    per_rung = dict.fromkeys(RUNGS, 0)
    for row in rows:
        level = run.level[str(row.source_id)]
        ran = RUNGS[: min(level + 1, len(RUNGS))]
        assert list(row.computation_buckets) == list(ran), row.source_id
        for rung in ran:
            per_rung[rung] += 1
            right = SAMPLES if RUNGS.index(rung) >= level else 0
            assert row.computation_buckets[rung] == [right, SAMPLES]
        assert row.bucket == (RUNGS[level] if level < len(RUNGS) else "unsolved")
    assert {r: run.world.stages[f"ladder.{r}"] for r in RUNGS} == per_rung  # one call each
    saved = sum((len(RUNGS) - len(r.computation_buckets)) * SAMPLES for r in rows)
    assert run.result.counts["ladder.samples_saved"] == saved > 0


def test_effective_difficulty_follows_the_planted_levels(run: Run) -> None:
    rows = labelled(run)
    means = []
    for level in range(4):
        scores = [r.difficulty for r in rows if run.level[str(r.source_id)] == level]
        assert scores and all(s is not None and 0.0 <= s <= 1.0 for s in scores)
        means.append(sum(scores) / len(scores))  # type: ignore[arg-type]
    assert means == sorted(means) and means[0] < means[-1]
    assert all(r.difficulty_se and r.difficulty_se > 0 for r in rows)
    assert {r.difficulty_method for r in rows} == {rows[0].difficulty_method}
    assert "rasch" in str(rows[0].difficulty_method)


def test_domain_and_structure_are_on_every_row(run: Run) -> None:
    for row in labelled(run):
        assert row.domain_heuristic in ("algebra", "number theory", "combinatorics", "geometry")
        assert row.domain and row.domain_confidence is not None
        assert row.structure is not None and row.structure.subdomain == "word problems"
        assert row.structure.depth == 3
    assert run.world.stages["structure"] == run.result.curated


def test_splits_account_for_every_row_and_load_as_a_datasetdict(run: Run) -> None:
    import datasets

    r = run.result
    assert r.train + r.validation + r.test + r.filtered == r.curated
    assert r.train and r.validation and r.test
    splits = {s: jsonl(run.out / f"{s}.jsonl") for s in ("train", "validation", "test")}
    for name, rows in splits.items():
        assert all(row["split"] == name for row in rows)
    clusters = [{row["cluster_id"] for row in rows} for rows in splits.values()]
    assert not (clusters[0] & clusters[1] or clusters[0] & clusters[2] or clusters[1] & clusters[2])
    data = datasets.load_from_disk(str(run.out / "hf"))
    assert {k: len(v) for k, v in data.items()} == {k: len(v) for k, v in splits.items()}


def test_cli_curate_then_evaluate_the_test_split(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    planted = planted_input(per_kind=1)
    data = write_jsonl(tmp_path / "in.jsonl", planted.rows)
    by_key, _ = _levels(planted)
    world = CurateWorld(planted.kinds, rungs=RUNGS, levels=by_key)
    env = run_env(prefect_api)
    out = tmp_path / "run"
    with FakeOpenAIServer(world) as fake:
        rungs = json.dumps(RUNG_MODELS)
        curated = subprocess.run(
            [
                *(sys.executable, "-m", "mathmill", "run", "curate", "--input", str(data)),
                *("--out", str(out), "--base-url", fake.base_url, "--model", "fake"),
                *("--benchmarks", "math500,amc23,aime", "--sandbox-timeout", "1.5"),
                *("--set", f"rungs={rungs}", "--ladder-samples", "2", "--no-progress"),
                *("--set", "splits.train=0.4", "--set", "splits.validation=0.2"),
                *("--set", "splits.test=0.4", "--set", "filters.drop_unsolved=false"),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert curated.returncode == 0, curated.stderr[-3000:]
        test_rows = jsonl(out / "test.jsonl")
        assert test_rows
        evaluated = subprocess.run(
            [
                *(sys.executable, "-m", "mathmill", "run", "evaluate"),
                *("--input", str(out / "test.jsonl"), "--out", str(tmp_path / "eval")),
                *("--base-url", fake.base_url, "--model", "fake", "--no-progress"),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "accuracy" in evaluated.stdout
    ev = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert ev["overall"]["problems"] == len(test_rows)
    # the evaluated model plays the largest rung: it solves what any rung solved
    solved = sum(1 for r in test_rows if r["bucket"] != "unsolved")
    assert ev["overall"]["pass@n"] == solved
    assert set(ev["by"]) == {"bucket", "domain", "structure"}
    assert sum(g["graded"] for g in ev["by"]["bucket"].values()) == ev["overall"]["graded"]
    wrong = ev["failures"]["wrong_value"]
    assert wrong["count"] == len(test_rows) - solved
    assert all(e["answer"] != e["reference"] for e in wrong["examples"])


def test_a_rung_down_stops_the_ladder_before_the_next_rung_and_resumes(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.errors import IncompleteRun

    planted = planted_input(per_kind=1)
    data = write_jsonl(tmp_path / "in.jsonl", planted.rows)
    by_key, _ = _levels(planted)
    world = CurateWorld(planted.kinds, rungs=RUNGS, levels=by_key, failing={"ladder.medium"})
    with FakeOpenAIServer(world) as fake:
        params = CurateParams.model_validate(
            {
                "input": str(data),
                "out": str(tmp_path / "run"),
                "benchmarks": ["math500", "amc23", "aime"],
                "solver": {"base_url": fake.base_url, "model": "fake", "max_retries": 0},
                "sandbox": {"timeout_s": 1.5},
                "rungs": RUNG_MODELS,
                "ladder_samples": SAMPLES,
            }
        )
        with pytest.raises(IncompleteRun, match=r"ladder\.medium"):
            asyncio.run(curate(params=params))
        assert world.stages["ladder.large"] == 0  # nothing sent past the rung that was down
        world.failing.clear()
        result: CurateResult = asyncio.run(curate(params=params))
    assert result.train + result.validation + result.test + result.filtered == result.curated
    assert world.paid_twice() == {}  # the small rung's answers were replayed, not paid again


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"keep_domains": ["Algebra"]}, "keep_domains"),
        ({"rungs": [{"name": "unsolved"}]}, "bucket name"),
        ({"rungs": [{"name": "a"}, {"name": "a"}]}, "names must differ"),
        ({"splits": {"stratify_by": ["level"]}}, "unknown columns"),
        ({"filters": {"require_labels": ["structure"]}}, "unknown columns"),
    ],
)
def test_bad_label_settings_fail_before_any_stage(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CurateParams.model_validate({"input": "x.jsonl", "decontaminate": False} | extra)
