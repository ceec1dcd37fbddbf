"""The synthesize flow end to end: a real Prefect server, real HTTP to a scripted fake
OpenAI server (tests/synth_world.py), the real local sandbox, Parquet on disk and S3.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mathmill.errors import MathmillError
from mathmill.flows.synthesize import SynthesizeParams, SynthesizeResult, synthesize
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import Attempt, Dropped, Problem, SolutionRow, Topic
from mathmill.storage import RunStore, StorageConfig
from tests.synth_world import OUTCOME, SynthWorld

pytestmark = pytest.mark.timeout(600)

ROUNDS = 2
KIND = re.compile(r"^\[(\w+)\]")


def world_config(base_url: str, out: str, **extra: Any) -> SynthesizeParams:
    """Ten topics, one of each kind of tests/synth_world.py, two problems each."""
    fields: dict[str, Any] = {
        "out": out,
        "topics": 10,
        "problems_per_topic": 2,
        "short_cots": 1,
        "rounds": ROUNDS,
        "chunk_size": 4,
        "concurrency": 8,
        "models": {"default": {"base_url": base_url, "model": "fake", "max_retries": 0}},
        "sandbox": {"timeout_s": 1.0, "workers": 2},
    }
    return SynthesizeParams.model_validate(fields | extra)


def run_flow(cfg: SynthesizeParams) -> SynthesizeResult:
    result: SynthesizeResult = asyncio.run(synthesize(params=cfg))
    return result


@dataclass
class Run:
    world: SynthWorld
    fake: FakeOpenAIServer
    out: Path
    result: SynthesizeResult
    answered: int
    flow_run_id: Any

    @property
    def store(self) -> RunStore:
        return RunStore(str(self.out))


@pytest.fixture(scope="module")
def run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    world = SynthWorld()
    out = tmp_path_factory.mktemp("synth") / "run"
    with FakeOpenAIServer(world) as fake:
        state = asyncio.run(
            synthesize(params=world_config(fake.base_url, str(out)), return_state=True)
        )
        result = state.result()
        yield Run(world, fake, out, result, world.answered, state.state_details.flow_run_id)


def kind_of(statement: str) -> str:
    m = KIND.match(statement)
    assert m, statement
    return m.group(1)


def test_every_row_is_accounted_for_with_its_reason(run: Run) -> None:
    store = run.store
    problems = store.dataset("problems").read_all(Problem)
    rows = [
        *store.dataset("verified").read_all(SolutionRow),
        *store.dataset("unverified").read_all(SolutionRow),
    ]
    assert len(problems) == 17  # 20 written, 2 gave their answer away, 1 duplicate
    assert len(rows) == 17 * 2  # one long and one short CoT each
    assert {r.problem_id for r in rows} == {p.id for p in problems}
    seen = Counter()
    for row in rows:
        kind = kind_of(row.problem)
        status, final_round = OUTCOME.get(kind, ("verified", 0))  # "dup" behaves as "ok"
        assert row.status == status, (kind, row.reason)
        assert row.rounds == (ROUNDS if final_round is None else final_round), kind
        assert len(row.lineage) == row.rounds + 1
        seen[kind] += 1
    assert seen == {k: 4 for k in OUTCOME} | {"dup": 2}
    counts = run.result.counts
    assert counts["verify.verified_round_0"] == 6
    assert counts["verify.verified_round_1"] == 4
    for status in ("wrong_answer", "error", "leak", "no_answer", "timeout", "llm_error"):
        assert counts[f"verify.unverified.{status}"] == 4, status
    # one blind program per problem with a verified row (ok, fix, dup); each agreed
    assert counts["verify.blind_problems"] == 5 and counts["verify.blind_agreed"] == 10
    assert "verify.unverified.disagreement" not in counts
    assert run.result.verified == 10
    assert run.result.unverified == 24


def test_failure_reasons_say_what_went_wrong(run: Run) -> None:
    rows = run.store.dataset("unverified").read_all(SolutionRow)
    by_kind = {kind_of(r.problem): r for r in rows}
    assert "TypeError" in by_kind["crash"].reason or "ZeroDivisionError" in by_kind["crash"].reason
    assert "hard-codes the answer" in by_kind["leak"].reason
    assert "no \\boxed{}" in by_kind["noanswer"].reason
    assert "time limit" in by_kind["spin"].reason
    assert "HTTP 400" in by_kind["bad"].reason
    stuck = by_kind["stuck"]
    assert stuck.computed_answer is not None and stuck.final_answer is not None
    assert int(stuck.final_answer) == int(stuck.computed_answer) + 1


def test_rewrite_rounds_are_kept_as_lineage(run: Run) -> None:
    store = run.store
    attempts = {a.id: a for a in store.dataset("attempts").read_all(Attempt)}
    problems = {p.id: p for p in store.dataset("problems").read_all(Problem)}
    fixed = [
        r for r in store.dataset("verified").read_all(SolutionRow) if kind_of(r.problem) == "fix"
    ]
    assert len(fixed) == 4
    for row in fixed:
        first, second = (attempts[i] for i in row.lineage)
        assert (first.round, second.round) == (0, 1)
        assert second.parent_id == first.id and first.parent_id is None
        assert first.verdict is not None and first.verdict.status == "wrong_answer"
        assert second.verdict is not None and second.verdict.status == "verified"
        assert second.prompt is not None and second.prompt.template_id == "synth_rewrite"
        assert problems[row.problem_id].statement == row.problem
        # every step of the verification is kept on the attempt
        for a in (first, second):
            assert a.draft_code and a.code and a.execution and a.critique
            assert a.critique.scores == {"alignment": 9.0, "rigor": 8.0, "complexity": 10.0}
            assert set(a.step_prompts) == {"synth_code", "synth_critique", "synth_regen_code"}
            assert a.execution.status == "ok" and a.leak_score is not None
            assert a.metadata["cot_type"] == a.kind
    leaks = [a for a in attempts.values() if a.verdict and a.verdict.status == "leak"]
    assert leaks and all((a.leak_score or 0) >= 0.6 for a in leaks)


def test_dropped_rows_are_kept_with_their_reason(run: Run) -> None:
    dropped = run.store.dataset("dropped").read_all(Dropped)
    reasons = Counter((d.stage, d.reason) for d in dropped)
    assert reasons == {
        ("topics", "duplicate"): 1,
        ("problems", "contains_solution"): 2,
        ("dedup", "duplicate"): 1,
    }
    leaky = [d for d in dropped if d.reason == "contains_solution"]
    assert all("Answer:" in d.detail and d.record_type == "Problem" for d in leaky)
    assert Problem.model_validate(leaky[0].record).statement.startswith("[leaky]")
    topics = run.store.dataset("topics").read_all(Topic)
    assert len(topics) == 10 and len({t.id for t in topics}) == 10


def test_rows_record_provenance_and_jsonl_matches_parquet(run: Run) -> None:
    store = run.store
    verified = store.dataset("verified").read_all(SolutionRow)
    lines = (run.out / "verified.jsonl").read_text().splitlines()
    assert [SolutionRow.model_validate_json(line) for line in lines] == verified
    unverified = (run.out / "unverified.jsonl").read_text().splitlines()
    assert len(unverified) == run.result.unverified
    for row in verified:
        assert row.model == "fake"
        assert set(row.prompts) >= {"synth_code", "synth_critique", "synth_regen_code"}
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in row.prompts.values())
        assert row.prompt_tokens > 0 and row.completion_tokens > 0
    assert {r.cot_type for r in verified} == {"long_cot", "short_cot"}
    report = (run.out / "report.md").read_text()
    assert "| verify | unverified.timeout | 4 |" in report
    assert "verify.critique" in report
    manifest = json.loads((run.out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["params"]["topics"] == 10


def test_artifacts_are_on_the_prefect_server(run: Run) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    async def read(key: str) -> list[Any]:
        async with get_client() as client:
            flt = ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.flow_run_id]),
            )
            return list(await client.read_artifacts(artifact_filter=flt))

    (table,) = asyncio.run(read("synthesize-counts"))
    data = table.data if isinstance(table.data, list) else json.loads(table.data)
    rows = {(r["stage"], r["outcome"]): r["rows"] for r in data}
    assert rows[("verify", "verified_round_1")] == 4
    assert rows[("problems", "contains_solution")] == 2
    (report,) = asyncio.run(read("synthesize-report"))
    assert "LLM calls, tokens and cost by stage" in str(report.data)
    progress = asyncio.run(read("synthesize-progress"))
    assert progress and float(progress[-1].data) == 100.0


def test_rerun_reuses_every_chunk_and_pays_nothing(run: Run) -> None:
    before = run.world.answered
    again = run_flow(world_config(run.fake.base_url, str(run.out)))
    assert run.world.answered == before  # not a single request
    assert again.counts == run.result.counts
    assert all(s["reused"] == s["chunks"] for s in again.stages.values())
    assert again.verified == run.result.verified


def test_endpoint_down_keeps_finished_rows_and_resume_pays_nothing_twice(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    world = SynthWorld(failing={"verify.critique"})
    with FakeOpenAIServer(world) as fake:
        cfg = world_config(fake.base_url, str(tmp_path / "run"))
        with pytest.raises(MathmillError, match=r"chunks did not finish.*re-run the same command"):
            run_flow(cfg)
        store = RunStore(str(tmp_path / "run"))
        assert len(store.dataset("cots").read_all(Attempt)) == 34  # finished stages kept
        assert "INCOMPLETE" in (tmp_path / "run" / "report.md").read_text()
        assert not store.dataset("verified").keys()
        world.failing.clear()
        result = run_flow(cfg)
    assert result.verified == 10 and result.unverified == 24
    assert world.paid_twice() == {}


def test_each_role_uses_its_own_endpoint_and_the_key_stays_secret(
    prefect_api: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-test-SECRET-4711"
    monkeypatch.setenv("CRITIC_KEY", secret)
    main, critic = SynthWorld(kinds=("ok", "fix")), SynthWorld(kinds=("ok", "fix"))
    with FakeOpenAIServer(main) as a, FakeOpenAIServer(critic) as b:
        cfg = world_config(a.base_url, str(tmp_path / "run"), topics=2)
        models = cfg.models.model_dump()
        models["critic"] = {"base_url": b.base_url, "model": "judge", "api_key_env": "CRITIC_KEY"}
        result = run_flow(cfg.model_copy(update={"models": type(cfg.models)(**models)}))
        stages_a = {r.headers.get("x-mathmill-stage") for r in a.requests}
        stages_b = {r.headers.get("x-mathmill-stage") for r in b.requests}
        auth_b = {r.headers.get("authorization") for r in b.requests}
        auth_a = {r.headers.get("authorization") for r in a.requests}
    assert stages_b == {"verify.critique"} and "verify.critique" not in stages_a
    assert auth_b == {f"Bearer {secret}"} and auth_a == {"Bearer EMPTY"}
    assert result.verified == 8
    rows = RunStore(str(tmp_path / "run")).dataset("attempts").read_all(Attempt)
    assert {a.critique.model for a in rows if a.critique} == {"judge"}
    assert {a.step_models.get("critic") for a in rows if a.critique} == {"judge"}
    assert {a.step_models.get("coder") for a in rows if a.critique} == {"fake"}
    # the key is in no file of the run: Parquet, JSONL, report, manifest, call cache
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["params"]["models"]["critic"]["api_key_env"] == "CRITIC_KEY"


def test_switching_settings_back_and_forth_in_one_directory(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    """A run with other settings removes the chunks it did not make; going back to the
    first settings must recompute those, not trust their completion files.
    """
    world = SynthWorld(kinds=("ok", "fix", "stuck"))
    with FakeOpenAIServer(world) as fake:
        first = world_config(fake.base_url, str(tmp_path / "run"), topics=3)
        one = run_flow(first)
        other = run_flow(first.model_copy(update={"rounds": 0}))
        again = run_flow(first)
    assert other.verified < one.verified  # without rewrites, "fix" stays unverified
    assert (again.verified, again.unverified) == (one.verified, one.unverified)
    assert again.counts == one.counts
    assert world.paid_twice() == {}  # recomputed chunks replayed their calls


def test_bad_parameter_fails_before_any_call_naming_the_field(
    prefect_api: dict[str, str], fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match="topics"):
        asyncio.run(synthesize(params={"out": str(tmp_path), "topics": 0}))  # type: ignore[arg-type]
    with pytest.raises(Exception, match="chunk_size"):
        asyncio.run(synthesize(params={"out": str(tmp_path), "chunk_size": "many"}))  # type: ignore[arg-type]
    assert fake.requests == []


def test_writes_parquet_to_s3(
    prefect_api: dict[str, str], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    from tests.conftest import S3_KEY, S3_SECRET

    for name, value in (
        ("AWS_ACCESS_KEY_ID", S3_KEY),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="synth")
    world = SynthWorld(kinds=("ok", "fix"))
    with FakeOpenAIServer(world) as fake:
        cfg = world_config(
            fake.base_url,
            "s3://synth/runs/one",
            topics=2,
            storage_endpoint_url=s3_endpoint,
            sandbox={"timeout_s": 2.0, "workers": 1},
        )
        result = run_flow(cfg)
    assert result.out == "s3://synth/runs/one"
    store = RunStore(StorageConfig(url="s3://synth/runs/one", endpoint_url=s3_endpoint))
    rows = store.dataset("verified").read_all(SolutionRow)
    assert len(rows) == result.verified == 8
    assert b"synth_code" in store.read_bytes("verified.jsonl")
    assert store.exists("report.md")


# -- the CLI, kill -9 and resume ---------------------------------------------------------

CLI = [sys.executable, "-m", "mathmill"]


def cli_args(base_url: str, out: Path) -> list[str]:
    return [
        *CLI,
        "run",
        "synthesize",
        "--topics",
        "10",
        "--problems-per-topic",
        "2",
        "--short-cots",
        "1",
        "--rounds",
        str(ROUNDS),
        "--chunk-size",
        "4",
        "--concurrency",
        "4",
        "--base-url",
        base_url,
        "--model",
        "fake",
        "--sandbox-timeout",
        "1",
        "--out",
        str(out),
    ]


def cli_env(prefect_api: dict[str, str]) -> dict[str, str]:
    keep = ("HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep} | prefect_api


def rows_of(out: Path, base_url: str) -> list[dict[str, Any]]:
    """Every final row, without its timestamp and with the fake server's port hidden."""
    store = RunStore(str(out))
    rows = [
        *store.dataset("verified").read_all(SolutionRow),
        *store.dataset("unverified").read_all(SolutionRow),
    ]
    dumped = [r.model_dump(exclude={"created_at"}) for r in rows]
    for row in dumped:
        row["reason"] = row["reason"].replace(base_url, "<endpoint>")
    return sorted(dumped, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def uninterrupted(
    prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("cli") / "whole"
    with FakeOpenAIServer(SynthWorld()) as fake:
        done = subprocess.run(
            cli_args(fake.base_url, out), env=cli_env(prefect_api), capture_output=True, text=True
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 verified and 24 unverified rows" in done.stdout
    assert f"run directory: {out}" in done.stdout
    assert "verify" in done.stdout and "unverified.leak" in done.stdout
    return rows_of(out, fake.base_url)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [12, 160], ids=["during-problems", "during-verify"])
def test_kill_9_then_resume_pays_no_call_twice_and_matches_an_uninterrupted_run(
    prefect_api: dict[str, str],
    uninterrupted: list[dict[str, Any]],
    tmp_path: Path,
    kill_after: int,
) -> None:
    world = SynthWorld()
    out = tmp_path / "run"
    with FakeOpenAIServer(world) as fake:
        proc = subprocess.Popen(
            cli_args(fake.base_url, out),
            env=cli_env(prefect_api),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while world.answered < kill_after:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        world.paused.set()  # requests from now on hang: in flight, never answered
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        answered_before_kill = world.answered
        world.paused.clear()
        resumed = subprocess.run(
            cli_args(fake.base_url, out), env=cli_env(prefect_api), capture_output=True, text=True
        )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert answered_before_kill >= kill_after
    assert world.paid_twice() == {}
    result = json.loads((out / "manifest.json").read_text())["result"]
    reused = sum(s["reused"] for s in result["stages"].values())
    # the killed run's finished chunks were reused and its finished calls replayed
    assert reused > 0 or result["usage"]["total"]["cached"] > 0
    assert rows_of(out, fake.base_url) == uninterrupted


def test_cli_rejects_a_bad_value_in_one_line(prefect_api: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "run", "synthesize", "--topics", "0", "--out", str(tmp_path)],
        env=cli_env(prefect_api),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: invalid synthesize parameters: topics: Input should be greater than or equal to 1"
    ]


def test_cli_dry_run_prints_the_plan_and_calls_nothing(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    done = subprocess.run(
        [
            *CLI,
            *("run", "synthesize", "--topics", "3", "--problems-per-topic", "2"),
            *("--short-cots", "2", "--base-url", fake.base_url, "--model", "m"),
            *("--out", str(tmp_path / "dry"), "--dry-run"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert (plan["topics"], plan["problems"], plan["cots"]) == (3, 6, 18)
    assert "nothing was called" in done.stdout
    assert fake.requests == []
    assert not (tmp_path / "dry").exists()


def test_cli_config_file_that_does_not_parse_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("topics: [oops\n")
    done = subprocess.run(
        [*CLI, "run", "synthesize", "--config", str(config), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: config file {config} does not parse: while parsing")


def test_cli_reads_a_yaml_config_and_flags_override_it(tmp_path: Path) -> None:
    config = tmp_path / "synth.yaml"
    config.write_text(
        "topics: 7\nrounds: 1\nmodels:\n  critic:\n    base_url: http://critic:8000/v1\n"
        "    model: judge\n"
    )
    done = subprocess.run(
        [*CLI, "run", "synthesize", "--config", str(config), "--topics", "4", "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert plan["topics"] == 4
    assert plan["roles"]["critic"] == "http://critic:8000/v1 judge"
    assert plan["roles"]["coder"] == "embedded"
