"""The formal pipeline: its pure parts, and the whole flow on planted Coq lemmas
against the fake server (reasoner, judge, and a vLLM-shaped scorer), with real Coq
replay, real Parquet and a kill -9 / resume that pays no call twice.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from mathmill.errors import ConfigError
from mathmill.flows.formal import FormalParams, FormalResult, formal
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import (
    Dropped,
    ErrorInfo,
    FormalLemma,
    FormalReasoning,
    Generation,
    Goal,
    ProofState,
    TokenLogprob,
)
from mathmill.storage import RunStore
from mathmill.tasks.formal import goals_text, score_lemma, score_prompt, tactic_tokens
from tests.formal_world import COPY_MARK, PLANTED, FormalWorld
from tests.resume_support import kill_9_midway, run_env

KEPT = {"add_zero_r", "add_succ_r", "triple_plus", "double_even", "le_add_both", "mul_two_r"}
KEPT |= {"after_broken"}  # add_comm' has 9 steps, one_step 1, broken_swap does not replay


def lemma(**extra: Any) -> FormalLemma:
    fields: dict[str, Any] = {
        "id": "x",
        "name": "addn0",
        "module": "M",
        "file": "m.v",
        "line": 1,
        "statement": "Lemma addn0 n : n + 0 = n.",
        "proof": "Proof.\nby elim: n.\nQed.",
        "tactics": ["elim: n.", "by []."],
    }
    return FormalLemma.model_validate(fields | extra)


def test_tactic_tokens_are_the_suffix_that_spells_the_tactics() -> None:
    words = ["(*", " Lemma", " *)\n", "Proof", ".\n", "elim", ":", " n", ".\n", "by", " [].", ""]
    lp = [TokenLogprob(token=w, logprob=-float(i)) for i, w in enumerate(words)]
    got = tactic_tokens(lp, "elim: n.\nby [].")
    assert [t.token for t in got] == ["elim", ":", " n", ".\n", "by", " [].", ""]
    with pytest.raises(ValueError, match="cover"):
        tactic_tokens(lp[-2:], "elim: n.\nby [].")


def test_a_span_that_does_not_spell_the_tactics_is_refused_not_guessed() -> None:
    # a token split inside a multi-byte character decodes to U+FFFD on its own
    split = ["Proof", ".\n", "rewrite", " \ufffd", "\ufffd", " x."]
    with pytest.raises(ValueError, match="multi-byte"):
        tactic_tokens([TokenLogprob(token=t, logprob=-1.0) for t in split], "rewrite ≤ x.")
    # a token across the boundary between the header and the tactics
    across = ["Proof", ".\nby", " []."]
    with pytest.raises(ValueError, match="straddles"):
        tactic_tokens([TokenLogprob(token=t, logprob=-1.0) for t in across], "by [].")
    # whitespace before the tactics in their first token is fine
    spaced = [TokenLogprob(token=t, logprob=-1.0) for t in ["Proof.", "\nby", " []."]]
    assert [t.token for t in tactic_tokens(spaced, "by [].")] == ["\nby", " []."]


def test_a_reasoning_that_could_not_be_scored_is_left_out_not_the_lemma() -> None:
    x = lemma(reasonings=[FormalReasoning(index=0, text="a"), FormalReasoning(index=1, text="b")])
    tail = [TokenLogprob(token=t, logprob=v) for t, v in (("elim: n.\n", -2.0), ("by [].", -1.0))]
    head = [TokenLogprob(token="Proof.\n", logprob=-0.1)]
    failed = ErrorInfo(kind="bad_request", message="prompt too long", stage="formal_score")
    by_id = {
        "x:none": Generation(id="x:none", model="s", prompt_logprobs=head + tail),
        "x:0": Generation(
            id="x:0",
            model="s",
            prompt_logprobs=head + [t.model_copy(update={"logprob": -0.5}) for t in tail],
        ),
        "x:1": Generation(id="x:1", model="s", error=failed),
    }
    scored = score_lemma(x, by_id)
    assert [r.index for r in scored.reasonings] == [0]
    assert scored.reasonings[0].score == pytest.approx(-0.5 - (-1.5))
    assert scored.reasonings[0].scored_by == "s"
    assert "prompt too long" in str(scored.metadata["not_scored"])
    with pytest.raises(ValueError, match="no reasoning"):
        score_lemma(x, {**by_id, "x:0": by_id["x:1"].model_copy(update={"id": "x:0"})})


def test_score_prompt_puts_the_tactics_last_with_and_without_the_reasoning() -> None:
    x = lemma()
    with_r = score_prompt(x, "Induct on n.")
    without = score_prompt(x, None)
    assert with_r.endswith("Proof.\nelim: n.\nby [].") and without.endswith(
        "Proof.\nelim: n.\nby []."
    )
    assert "Induct on n." in with_r and "Reasoning" not in without
    assert with_r.startswith(without.split("(* Proof *)")[0])


def test_goals_text_shows_hypotheses_and_conclusions() -> None:
    x = lemma(
        states=[
            ProofState(goals=[Goal(hypotheses=["n : nat"], conclusion="n + 0 = n")]),
            ProofState(goals=[]),
        ]
    )
    text = goals_text(x)
    assert "n : nat" in text and "n + 0 = n" in text and "no goals" in text
    assert goals_text(lemma()) == "(not recorded)"


def test_params_refuse_bad_bounds_and_name_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_steps"):
        FormalParams(source=str(tmp_path), min_steps=5, max_steps=3)
    with pytest.raises(ValueError, match="logical"):
        FormalParams(logical="X")
    with pytest.raises(ConfigError, match="not a directory"):
        FormalParams(source=str(tmp_path / "nope")).check_input()
    with pytest.raises(ConfigError, match=r"no \.v files"):
        FormalParams(source=str(tmp_path)).check_input()
    shutil.copy(PLANTED / "Sums.v", tmp_path)
    with pytest.raises(ConfigError, match=r"Other\.v"):
        FormalParams(source=str(tmp_path), files=["Other.v"]).check_input()


# -- the flow -------------------------------------------------------------------------------


def params(base_url: str, out: Path, **extra: Any) -> FormalParams:
    fields: dict[str, Any] = {
        "source": str(PLANTED),
        "logical": "Planted",
        "out": str(out),
        "endpoint": {"base_url": base_url, "model": "fake", "max_retries": 0},
        "scorer": {"base_url": base_url, "model": "fake-vllm"},
        "reasonings": 3,
        "num_documents": 6,
        "items_per_chunk": 2,
        "replay_timeout_s": 60,
    }
    return FormalParams.model_validate(fields | extra)


def read(out: Path, dataset: str, model: type[Any]) -> list[Any]:
    return RunStore(str(out)).dataset(dataset).read_all(model)


@pytest.mark.slow
def test_the_flow_on_planted_lemmas_keeps_a_reasoning_that_does_not_copy_the_tactics(
    tmp_path: Path,
) -> None:
    world = FormalWorld()
    with FakeOpenAIServer(world) as fake:
        result: FormalResult = asyncio.run(formal(params=params(fake.base_url, tmp_path / "run")))
    out = tmp_path / "run"
    assert result.lemmas == 10
    dropped = read(out, "dropped", Dropped)
    reasons = {d.target_id: (d.reason, d.detail) for d in dropped}
    by_name = {d.record.get("name"): d for d in dropped if isinstance(d.record, dict)}
    assert by_name["one_step"].reason == "too_few_steps"
    assert by_name["add_comm'"].reason == "too_many_steps"
    broken = by_name["broken_swap"]
    assert broken.reason == "replay_failed" and "unify" in broken.detail, reasons
    assert result.replayed == len(KEPT)  # after_broken replays although broken_swap failed
    assert result.selected == 6
    kept = read(out, "formal", FormalLemma)
    assert {x.name for x in kept} <= KEPT and len(kept) == result.kept == 6
    for x in kept:
        assert x.states is not None and len(x.states) == len(x.tactics)
        assert x.states[0].goals and x.states[0].goals[0].conclusion
        chosen = next(r for r in x.reasonings if r.index == x.chosen)
        assert chosen.verdict == "pass" and COPY_MARK not in chosen.text
        assert all(r.score is not None and r.scored_by == "fake-vllm" for r in x.reasonings)
    table = pq.read_table(out / "formal.parquet")
    for column in ("statement", "goals", "proof", "tactics", "reasoning", "score", "verdict"):
        assert column in table.column_names
    assert table.num_rows == 6
    assert world.paid_twice() == {}
    # a re-run is served from the run directory: no call at all
    before = sum(world.stages.values())
    with FakeOpenAIServer(world) as fake:
        again = asyncio.run(formal(params=params(fake.base_url, tmp_path / "run")))
    assert sum(world.stages.values()) == before and again.kept == 6


def command(base_url: str, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "mathmill", "run", "formal", "--source", str(PLANTED)),
        *("--logical", "Planted", "--out", str(out), "--base-url", base_url, "--model", "fake"),
        *("--scorer-base-url", base_url, "--scorer-model", "fake-vllm"),
        *("--reasonings", "3", "--num-documents", "7", "--items-per-chunk", "1"),
        *("--concurrency", "1", "--no-progress"),
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_mid_reasoning_then_resume_pays_no_call_twice(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    world = FormalWorld()
    with FakeOpenAIServer(world) as fake:
        kill_9_midway(
            command(fake.base_url, tmp_path / "run"),
            run_env(prefect_api),
            ready=lambda: world.stages["formal_reason"] >= 3,
            paused=world.paused,
        )
        killed_at = dict(world.stages)
        resumed = subprocess.run(
            command(fake.base_url, tmp_path / "run"),
            env=run_env(prefect_api),
            capture_output=True,
            text=True,
        )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 3 <= killed_at["formal_reason"] < 7  # killed mid-reasoning
    assert world.stages["formal_reason"] == 7  # every lemma reasoned once in all
    assert world.paid_twice() == {}
    kept = read(tmp_path / "run", "formal", FormalLemma)
    assert len(kept) == 7 and {x.name for x in kept} == KEPT
    assert "7 kept with a reasoning" in resumed.stdout


@pytest.mark.slow
def test_with_the_judge_off_the_best_scored_reasoning_is_kept_unjudged(tmp_path: Path) -> None:
    world = FormalWorld()
    with FakeOpenAIServer(world) as fake:
        cfg = params(fake.base_url, tmp_path / "run", judge_enabled=False)
        result: FormalResult = asyncio.run(formal(params=cfg))
    assert result.kept == 6 and result.rejected == 0
    assert world.stages["formal_judge"] == 0
    for x in read(tmp_path / "run", "formal", FormalLemma):
        best = max(x.reasonings, key=lambda r: (r.score, -r.index))
        assert x.chosen == best.index
        assert all(r.verdict is None for r in x.reasonings)
