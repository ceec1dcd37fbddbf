"""The critique pipeline on a real Prefect server and real Parquet, against a fake
OpenAI server playing two models with scripted right/wrong patterns: every filter rule
and the K-per-question balancing give exactly the expected rows; the verl parquet has
verl's columns and types and round-trips through ``datasets``; a teacher's critiques are
kept only when they agree with the grader; a re-run pays for nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mathmill.flows.critique import CritiqueParams, CritiqueResult, critique
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply, Response
from mathmill.records import CritiqueExample, MergedProblem
from mathmill.storage import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SAMPLES = 4
R, W = True, False
# problem -> (reference answer, model a's pattern, model b's pattern); None: no reference
WORLD: dict[str, tuple[str | None, list[bool], list[bool]]] = {
    "mixed_and_right": ("11", [R, R, W, W], [R, R, R, R]),
    "all_right": ("12", [R, R, R, R], [R, R, R, R]),
    "all_wrong": ("13", [W, W, W, W], [W, W, W, W]),
    "models_differ": ("14", [R, R, R, R], [W, W, W, W]),
    "both_mixed": ("15", [R, W, W, W], [R, R, R, W]),
    "no_reference": (None, [R, R, W, W], [R, W, R, W]),
}
EXPECTED = {  # rule -> problem -> (kept, reason)
    "any_mixed": {
        "mixed_and_right": (True, "mixed"),
        "all_right": (False, "all_right"),
        "all_wrong": (False, "all_wrong"),
        "models_differ": (False, "models_consistent"),
        "both_mixed": (True, "mixed"),
        "no_reference": (False, "ungraded"),
    },
    "disagree": {
        "mixed_and_right": (True, "mixed"),
        "all_right": (False, "all_right"),
        "all_wrong": (False, "all_wrong"),
        "models_differ": (True, "models_disagree"),
        "both_mixed": (True, "mixed"),
        "no_reference": (False, "ungraded"),
    },
    "all": {
        name: (name != "no_reference", "graded" if name != "no_reference" else "ungraded")
        for name in WORLD
    },
}


def statement(name: str) -> str:
    return f"Problem {name}: what number is asked for here?"


def write_input(path: Path) -> Path:
    rows = []
    for name, (answer, _, _) in WORLD.items():
        row: dict[str, Any] = {"problem": statement(name), "source": "scripted"}
        if answer is not None:
            row["answer"] = answer
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TwoModels:
    """The fake server's handler: each model answers each problem with its pattern
    (``\\boxed{answer}`` when right, ``\\boxed{999}`` when wrong); anything else (the
    teacher) concludes ``right``.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, request: RecordedRequest) -> Response:
        body = request.body or {}
        model = str(body.get("model"))
        text = " ".join(str(m.get("content")) for m in request.messages)
        self.calls[model] += 1
        if model not in ("a", "b"):
            return Reply("The steps hold up.\nConclusion: right [END]")
        name = next(n for n in WORLD if statement(n) in text)
        answer, *patterns = WORLD[name]
        pattern = patterns[0 if model == "a" else 1]
        n = int(body.get("n") or 1)
        right = answer or "7"
        return Reply(
            contents=[
                f"Working it out, sample {i}. \\boxed{{{right if ok else 999}}}"
                for i, ok in enumerate(pattern[:n])
            ]
        )


def params(base_url: str, data: Path, out: Path, **extra: Any) -> CritiqueParams:
    fields: dict[str, Any] = {
        "input": str(data),
        "out": str(out),
        "model_names": ["a", "b"],
        "endpoint": {"base_url": base_url, "max_retries": 0},
        "samples": SAMPLES,
        "max_tokens": 64,
        "chunk_size": 4,
    }
    return CritiqueParams.model_validate(fields | extra)


def run(cfg: CritiqueParams) -> CritiqueResult:
    result: CritiqueResult = asyncio.run(critique(params=cfg))
    return result


def merged(out: Path) -> dict[str, MergedProblem]:
    rows = RunStore(str(out)).dataset("merged").read_all(MergedProblem)
    return {r.problem.split(":")[0].removeprefix("Problem "): r for r in rows}


def examples(out: Path) -> list[CritiqueExample]:
    return RunStore(str(out)).dataset("critiques").read_all(CritiqueExample)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_input(tmp_path_factory.mktemp("critique") / "problems.jsonl")


@pytest.mark.parametrize("rule", ["any_mixed", "disagree", "all"])
def test_each_filter_rule_keeps_exactly_the_expected_problems(
    prefect_api: dict[str, str], tmp_path: Path, data: Path, rule: str
) -> None:
    handler = TwoModels()
    with FakeOpenAIServer(handler) as fake:
        result = run(params(fake.base_url, data, tmp_path / "run", keep=rule))
    assert handler.calls == {"a": len(WORLD), "b": len(WORLD)}  # one call per problem
    got = merged(tmp_path / "run")
    assert {k: (v.kept, v.reason) for k, v in got.items()} == EXPECTED[rule]
    assert [got[n].position for n in WORLD] == list(range(len(WORLD)))  # input order
    flags = {k: {m: t.flag for m, t in v.models.items()} for k, v in got.items()}
    assert flags["mixed_and_right"] == {"a": "mixed", "b": "all_right"}
    assert flags["models_differ"] == {"a": "all_right", "b": "all_wrong"}
    assert flags["no_reference"] == {"a": "ungraded", "b": "ungraded"}
    assert got["both_mixed"].models["a"].pass_rate == 0.25
    assert got["both_mixed"].pass_rate == 0.5
    kept = sum(v for v, _ in EXPECTED[rule].values())
    assert result.kept == kept and result.problems == len(WORLD)
    assert result.samples == len(WORLD) * 2 * SAMPLES
    dist = json.loads((tmp_path / "run" / "distribution.json").read_text())
    reasons = Counter(f"{'kept' if k else 'dropped'}.{r}" for k, r in EXPECTED[rule].values())
    assert {k: v for k, v in dist["filter"].items() if k != "rule"} == dict(reasons)


def _per_problem(rows: list[CritiqueExample]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for e in rows:
        name = e.question.split(":")[0].removeprefix("Problem ")
        out.setdefault(name, Counter())[e.target] += 1
    return out


EITHER = {(2, 1), (1, 2)}  # an odd K's extra place goes to a side drawn per problem


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (
            4,
            {
                "mixed_and_right": {(2, 2)},  # 6 right, 2 wrong
                "both_mixed": {(2, 2)},  # 4 right, 4 wrong
                "models_differ": {(2, 2)},
                "all_right": {(4, 0)},
                "all_wrong": {(0, 4)},
            },
        ),
        (
            3,
            {
                "mixed_and_right": EITHER,
                "both_mixed": EITHER,
                "models_differ": EITHER,
                "all_right": {(3, 0)},
                "all_wrong": {(0, 3)},
            },
        ),
        (
            7,
            {
                "mixed_and_right": {(5, 2)},  # the wrong side runs short
                "both_mixed": {(4, 3), (3, 4)},
                "models_differ": {(4, 3), (3, 4)},
                "all_right": {(7, 0)},
                "all_wrong": {(0, 7)},
            },
        ),
    ],
)
def test_k_per_question_is_balanced_right_and_wrong_from_both_models(
    prefect_api: dict[str, str],
    tmp_path: Path,
    data: Path,
    k: int,
    expected: dict[str, set[tuple[int, int]]],
) -> None:
    with FakeOpenAIServer(TwoModels()) as fake:
        result = run(params(fake.base_url, data, tmp_path / "run", keep="all", per_problem=k))
    rows = examples(tmp_path / "run")
    got = {n: (c["right"], c["wrong"]) for n, c in _per_problem(rows).items()}
    assert set(got) == set(expected)
    assert all(got[n] in allowed for n, allowed in expected.items()), got
    assert result.examples == len(rows) == k * len(expected)
    for e in rows:  # the target is the grader's verdict on the sample
        assert (e.final_answer == WORLD[e.question.split(":")[0][8:]][0]) == (e.target == "right")
        assert e.solution in e.prompt and e.question in e.prompt
        assert e.prompt.rstrip().endswith("`Conclusion: wrong [END]` if it is not.")
        assert e.data_source == "scripted_critique" and e.model in ("a", "b")
    both = [e for e in rows if e.question.startswith("Problem both_mixed")]
    for target in ("right", "wrong"):  # each side drawn from both models in turn
        models = [e.model for e in both if e.target == target]
        assert len(set(models)) == min(2, len(models))
    assert len({e.sample_id for e in rows}) == len(rows)


def test_an_odd_k_favours_neither_side() -> None:
    """K = 1 over 200 problems of 4 right and 4 wrong samples: about half each."""
    from mathmill.records import Sample
    from mathmill.tasks.critique import pick_examples

    def sample(i: int, right: bool) -> Sample:
        status = "correct" if right else "incorrect"
        return Sample(
            id=f"s{i}",
            problem_id="p",
            problem="x",
            reference="1",
            index=i,
            text="",
            status=status,
            generator="a" if i % 2 else "b",
        )

    pool = [sample(i, i < 4) for i in range(8)]
    drawn = [
        pick_examples(pool, 1, balance=True, rng=random.Random(f"0:p{n}"))[0].status
        for n in range(200)
    ]
    assert 70 <= drawn.count("correct") <= 130


def test_no_reference_means_ungraded_whatever_the_sample_printed() -> None:
    from mathmill.records import Sample
    from mathmill.tasks.critique import pick_examples, tally

    rows = [
        Sample(
            id=f"s{i}", problem_id="p", problem="x", reference=None, index=i, text="", status=status
        )
        for i, status in enumerate(["no_answer", "unvalidated", "error"])
    ]
    t = tally(rows)
    assert (t.right, t.wrong, t.ungraded, t.flag) == (0, 0, 3, "ungraded")
    assert pick_examples(rows, 4, balance=True, rng=random.Random(0)) == []


def test_a_conclusion_is_read_through_markdown() -> None:
    from mathmill.tasks.critique import parse_conclusion

    assert parse_conclusion("**Conclusion**: right [END]") == "right"
    assert parse_conclusion("Conclusion: `wrong` [END]") == "wrong"
    assert parse_conclusion("Conclusion: right.\nOn second thought, Conclusion: wrong") == "wrong"
    assert parse_conclusion("no verdict here") is None


def test_served_names_become_list_names_chunk_keys_allow() -> None:
    p = CritiqueParams(input="x.jsonl", model_names=["Qwen/Qwen2.5-7B", "a:b"])
    assert [m.name for m in p.all_models()] == ["Qwen_Qwen2.5-7B", "a_b"]
    assert [m.model.model for m in p.all_models()] == ["Qwen/Qwen2.5-7B", "a:b"]
    with pytest.raises(ValueError, match="distinct"):
        CritiqueParams(input="x.jsonl", model_names=["a/b", "a:b"])


def test_the_draw_is_seeded_and_a_rerun_pays_for_nothing(
    prefect_api: dict[str, str], tmp_path: Path, data: Path
) -> None:
    handler = TwoModels()
    with FakeOpenAIServer(handler) as fake:
        run(params(fake.base_url, data, tmp_path / "one"))
        paid = sum(handler.calls.values())
        again = run(params(fake.base_url, data, tmp_path / "one"))
        assert sum(handler.calls.values()) == paid  # everything replayed
        run(params(fake.base_url, data, tmp_path / "two"))
        other = run(params(fake.base_url, data, tmp_path / "three", seed=5))
    first = [e.sample_id for e in examples(tmp_path / "one")]
    assert first == [e.sample_id for e in examples(tmp_path / "two")]
    assert again.examples == len(first)
    assert other.examples == len(first)
    assert first != [e.sample_id for e in examples(tmp_path / "three")]


def test_verl_parquet_has_verls_columns_and_round_trips_through_datasets(
    prefect_api: dict[str, str], tmp_path: Path, data: Path
) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    with FakeOpenAIServer(TwoModels()) as fake:
        run(params(fake.base_url, data, tmp_path / "run", data_source="gsm_{source}"))
    path = tmp_path / "run" / "critique.parquet"
    schema = pq.read_schema(path)
    assert schema.field("data_source").type == pa.string()
    assert schema.field("ability").type == pa.string()
    prompt = schema.field("prompt").type
    assert pa.types.is_list(prompt)
    assert {f.name: f.type for f in prompt.value_type} == {
        "role": pa.string(),
        "content": pa.string(),
    }
    reward = schema.field("reward_model").type
    assert {f.name: f.type for f in reward} == {"ground_truth": pa.string(), "style": pa.string()}
    extra = {f.name for f in schema.field("extra_info").type}
    assert {"index", "original_solution", "question_ground_truth", "model"} <= extra
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    rows = list(loaded)
    assert len(rows) == len(examples(tmp_path / "run")) > 0
    for i, row in enumerate(rows):
        assert row["ability"] == "critique" and row["data_source"] == "gsm_scripted"
        assert row["prompt"][0]["role"] == "user"
        assert row["reward_model"]["style"] == "rule"
        assert row["reward_model"]["ground_truth"] in ("right", "wrong")
        assert row["extra_info"]["index"] == i
        assert row["extra_info"]["original_solution"] in row["prompt"][0]["content"]
    verl_jsonl = [json.loads(x) for x in (tmp_path / "run" / "critique_verl.jsonl").open()]
    assert verl_jsonl == rows


def test_a_teacher_critique_is_kept_only_when_it_agrees_with_the_grader(
    prefect_api: dict[str, str], tmp_path: Path, data: Path
) -> None:
    handler = TwoModels()
    with FakeOpenAIServer(handler) as fake:
        result = run(
            params(
                fake.base_url, data, tmp_path / "run", teacher=True, teacher_model={"model": "t"}
            )
        )
    rows = examples(tmp_path / "run")
    assert handler.calls["t"] == len(rows) == result.examples
    assert all(e.teacher_conclusion == "right" and e.teacher_model == "t" for e in rows)
    assert all((e.critique is not None) == (e.target == "right") for e in rows)
    sft = [json.loads(x) for x in (tmp_path / "run" / "critique_sft.jsonl").open()]
    assert len(sft) == sum(e.target == "right" for e in rows) > 0
    assert all(s["messages"][1]["content"].endswith("Conclusion: right [END]") for s in sft)
    told = [r for r in fake.requests if r.body and r.body.get("model") == "t"]
    assert len(told) == len(rows)
    assert all("correct final answer is" in r.messages[0]["content"] for r in told)


def test_the_command_line_runs_two_models_to_the_verl_parquet(
    prefect_api: dict[str, str], tmp_path: Path, data: Path
) -> None:
    with FakeOpenAIServer(TwoModels()) as fake:
        cmd = [sys.executable, "-m", "mathmill", "run", "critique", "--input", str(data)]
        cmd += ["--models", "a,b", "--base-url", fake.base_url, "--out", str(tmp_path / "run")]
        cmd += ["--set", "samples=4", "--set", "chunk_size=4", "--no-progress"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "critique examples" in done.stdout
    assert (tmp_path / "run" / "critique.parquet").exists()
    dist = json.loads((tmp_path / "run" / "distribution.json").read_text())
    assert set(dist["per_model"]) == {"a", "b"}
