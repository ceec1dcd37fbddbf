"""The tir flow: scripted multi-turn trajectories over real HTTP against the real local
sandbox (one stateful session each), checked down to the exact ShareGPT output.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mathmill.errors import MathmillError
from mathmill.flows.tir import TirParams, TirResult, tir
from mathmill.llm.fake_server import FakeOpenAIServer, Fault, RecordedRequest, Reply, Response
from mathmill.prompts import load_prompt
from mathmill.records import Attempt
from mathmill.storage import RunStore
from mathmill.tasks.tir import NUDGE, REMINDER, clean_reply
from tests.prefect_support import artifacts

pytestmark = pytest.mark.timeout(600)

SYSTEM = load_prompt("tir_system").render(max_output=2000).strip()

# problem -> the model's replies, turn by turn (the stop sequence </python> is dropped
# by servers, so most code replies end without it)
SCRIPTS: dict[str, list[str]] = {
    "Janet has 16 eggs, eats 3 and bakes 4, and sells the rest at $2. Dollars?": [
        "Eggs left, times two.\n<python>\nleft = 16 - 3 - 4\nprint(left * 2)\n",
        "She makes 18 dollars.\n<final_answer>\\boxed{18}</final_answer>",
    ],
    "What is 6 times 7?": [
        "It is 42.\n<final_answer>\\boxed{42}</final_answer>",
        "Let me check.\n<python>\nprint(6 * 7)\n",
        "Checked.\n<final_answer>\\boxed{42}</final_answer>",
    ],
    "What is 2 + 2?": [
        "<python>\nprint(2 + 2)\n</python>\n<repl>\n5\n</repl>\n<state>\nx=1\n</state>",
        "<final_answer>\\boxed{4}</final_answer>",
    ],
    "Prove the Riemann hypothesis.": ["I think it is true.", "Still thinking.", "Hmm."],
    "Count to infinity, then add 1.": [
        "<python>\nbase = 41\nwhile True:\n    pass\n",
        "Too slow; use what I have.\n<python>\nprint(base + 1)\n",
        "<final_answer>\\boxed{42}</final_answer>",
    ],
    "Let y = 21. What is 2y?": [
        "<python>\ny = 21\n",
        "<python>\nprint(y * 2)\n",
        "<final_answer>The answer is \\boxed{42}.</final_answer>",
    ],
    "What is 10 / 4?": [
        "<python>\nprint(10 / 4)\n",
        "<final_answer>\\boxed{2.5}</final_answer>",
    ],
}
ANSWERS = {
    "Janet has 16 eggs, eats 3 and bakes 4, and sells the rest at $2. Dollars?": "18",
    "What is 6 times 7?": "42",
    "What is 2 + 2?": "4",
    "Prove the Riemann hypothesis.": "true",
    "Count to infinity, then add 1.": "42",
    "Let y = 21. What is 2y?": "24",  # a wrong reference: the answer is graded incorrect
}


def handler(request: RecordedRequest) -> Response:
    messages = (request.body or {}).get("messages", [])
    problem = messages[1]["content"].strip()
    turn = sum(1 for m in messages if m["role"] == "assistant")
    script = SCRIPTS[problem]
    return Reply(script[turn] if turn < len(script) else "Nothing more.")


def write_input(path: Path) -> Path:
    rows = [
        {"id": f"t{i}", "problem": p, **({"answer": ANSWERS[p]} if p in ANSWERS else {})}
        for i, p in enumerate(SCRIPTS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return path


def params(base_url: str, tmp: Path, **extra: Any) -> TirParams:
    fields: dict[str, Any] = {
        "input": str(write_input(tmp / "in.jsonl")),
        "out": str(tmp / "run"),
        "max_turns": 3,
        "solver": {"base_url": base_url, "model": "fake", "max_retries": 0},
        "sandbox": {"timeout_s": 1.0, "workers": 1, "max_sessions": 4},
    }
    return TirParams.model_validate(fields | extra)


@pytest.fixture(scope="module")
def run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("tir")
    with FakeOpenAIServer(handler) as fake:
        state = asyncio.run(tir(params=params(fake.base_url, tmp), return_state=True))
        result: TirResult = state.result()
        yield tmp / "run", result, fake, state.state_details.flow_run_id


def conversations(out: Path, name: str) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return {r["id"]: r for r in rows}


def repl(output: str, state: str) -> dict[str, str]:
    return {"from": "tool", "value": f"<repl>\n{output}\n</repl>\n<state>\n{state}\n</state>"}


def head(problem: str) -> list[dict[str, str]]:
    return [{"from": "system", "value": SYSTEM}, {"from": "human", "value": problem}]


def test_code_then_output_then_final_answer(run: Any) -> None:
    out, _result, _fake, _id = run
    row = conversations(out, "sharegpt.jsonl")["t0"]
    problem = "Janet has 16 eggs, eats 3 and bakes 4, and sells the rest at $2. Dollars?"
    assert row["conversations"] == [
        *head(problem),
        {"from": "gpt", "value": SCRIPTS[problem][0] + "</python>"},
        repl("18", "vars: left=9"),
        {"from": "gpt", "value": "She makes 18 dollars.\n<final_answer>\\boxed{18}</final_answer>"},
    ]
    meta = row["metadata"]
    assert (meta["success"], meta["final_answer"], meta["verdict"]) == (True, "18", "correct")
    assert (meta["num_turns"], meta["num_code_blocks"], meta["num_nudges"]) == (2, 1, 0)
    assert meta["expected_answer"] == "18" and meta["model"] == "fake"
    assert len(meta["prompt_sha256"]) == 64


def test_answer_without_code_gets_a_nudge(run: Any) -> None:
    out, _result, _fake, _id = run
    row = conversations(out, "sharegpt.jsonl")["t1"]
    assert row["conversations"] == [
        *head("What is 6 times 7?"),
        {"from": "gpt", "value": "It is 42.\n<final_answer>\\boxed{42}</final_answer>"},
        {"from": "human", "value": NUDGE},
        {"from": "gpt", "value": "Let me check.\n<python>\nprint(6 * 7)\n</python>"},
        repl("42", "(empty)"),
        {"from": "gpt", "value": "Checked.\n<final_answer>\\boxed{42}</final_answer>"},
    ]
    assert row["metadata"]["num_nudges"] == 1 and row["metadata"]["verdict"] == "correct"


def test_hallucinated_tool_output_is_stripped_and_counted(run: Any) -> None:
    out, _result, _fake, _id = run
    row = conversations(out, "sharegpt.jsonl")["t2"]
    assert row["conversations"] == [
        *head("What is 2 + 2?"),
        {"from": "gpt", "value": "<python>\nprint(2 + 2)\n</python>"},
        repl("4", "(empty)"),
        {"from": "gpt", "value": "<final_answer>\\boxed{4}</final_answer>"},
    ]
    assert row["metadata"]["hallucinated_tags"] == 2


def test_max_turns_without_an_answer_fails(run: Any) -> None:
    out, _result, _fake, _id = run
    assert "t3" not in conversations(out, "sharegpt.jsonl")
    row = conversations(out, "failed.jsonl")["t3"]
    assert row["conversations"] == [
        *head("Prove the Riemann hypothesis."),
        {"from": "gpt", "value": "I think it is true."},
        {"from": "human", "value": REMINDER},
        {"from": "gpt", "value": "Still thinking."},
        {"from": "human", "value": REMINDER},
        {"from": "gpt", "value": "Hmm."},
        {"from": "human", "value": REMINDER},
    ]
    meta = row["metadata"]
    assert (meta["success"], meta["verdict"]) == (False, "failed")
    assert meta["reason"] == "no final answer after 3 model turns"


def test_sandbox_timeout_mid_trajectory_keeps_the_session(run: Any) -> None:
    out, _result, _fake, _id = run
    row = conversations(out, "sharegpt.jsonl")["t4"]
    timeout = "[timeout: the code ran past 1s; the session is as before]"
    assert row["conversations"] == [
        *head("Count to infinity, then add 1."),
        {"from": "gpt", "value": "<python>\nbase = 41\nwhile True:\n    pass\n</python>"},
        {"from": "tool", "value": f"<repl>\n{timeout}\n</repl>\n<state>\n(empty)\n</state>"},
        {
            "from": "gpt",
            "value": "Too slow; use what I have.\n<python>\nprint(base + 1)\n</python>",
        },
        row["conversations"][5],  # checked below
        {"from": "gpt", "value": "<final_answer>\\boxed{42}</final_answer>"},
    ]
    # the timed-out turn was discarded, so `base` never existed: a NameError, not 42
    error = row["conversations"][5]["value"]
    assert error.startswith("<repl>\n") and error.endswith("</repl>\n<state>\n(empty)\n</state>")
    assert "NameError: name 'base' is not defined" in error
    assert row["metadata"]["num_code_errors"] == 2


def test_state_is_carried_across_turns_and_graded_by_the_grader(run: Any) -> None:
    out, _result, _fake, _id = run
    row = conversations(out, "sharegpt.jsonl")["t5"]
    assert row["conversations"][2:6] == [
        {"from": "gpt", "value": "<python>\ny = 21\n</python>"},
        repl("(no output)", "vars: y=21"),
        {"from": "gpt", "value": "<python>\nprint(y * 2)\n</python>"},
        repl("42", "vars: y=21"),
    ]
    meta = row["metadata"]
    assert (meta["final_answer"], meta["expected_answer"], meta["verdict"]) == (
        "42",
        "24",
        "incorrect",
    )
    unvalidated = conversations(out, "sharegpt.jsonl")["t6"]["metadata"]
    assert (unvalidated["final_answer"], unvalidated["verdict"]) == ("2.5", "unvalidated")


def test_messages_form_and_stats(run: Any) -> None:
    out, result, _fake, _id = run
    messages = conversations(out, "messages.jsonl")["t0"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[3]["content"].startswith("<repl>\n18\n</repl>")
    assert result.stats == {
        "processed": 7,
        "successful": 6,
        "failed": 1,
        "success rate": "85.7%",
        "average turns": f"{(2 + 3 + 2 + 3 + 3 + 3 + 2) / 7:.2f}",
        "average code blocks": f"{(1 + 1 + 1 + 0 + 2 + 2 + 1) / 7:.2f}",
        "correct": 4,
        "incorrect": 1,
        "unknown (no expected answer)": 1,
        "accuracy of the validated": "80.0%",
        "nudges": 1,
        "hallucinated tool blocks removed": 2,
    }
    dropped = (out / "dropped.jsonl").read_text()
    assert "malformed_row" in dropped and "in.jsonl:8: not JSON" in dropped
    assert "| success rate | 85.7% |" in (out / "report.md").read_text()


def test_sessions_are_deleted_and_trajectories_kept_as_attempts(run: Any) -> None:
    out, _result, _fake, _id = run
    attempts = RunStore(str(out)).dataset("trajectories").read_all(Attempt)
    assert len(attempts) == 7 and {a.kind for a in attempts} == {"tir"}
    tools = [t for a in attempts for t in a.turns if t.role == "tool"]
    assert tools and all(t.execution is not None for t in tools)
    assert {t.execution.status for t in tools if t.execution} >= {"ok", "timeout", "error"}


def test_stats_artifact_is_on_the_server(run: Any) -> None:
    (artifact,) = artifacts(run[3], "tir-stats")
    data = artifact.data
    rows = data if isinstance(data, list) else json.loads(data)
    assert {"metric": "accuracy of the validated", "value": "80.0%"} in rows


def test_rerun_resumes_without_calls(run: Any, tmp_path: Path) -> None:
    out, result, fake, _id = run
    before = len(fake.requests)
    again = asyncio.run(tir(params=params(fake.base_url, out.parent)))
    assert len(fake.requests) == before
    assert again.stats == result.stats


def test_clean_reply_restores_the_stop_sequence_and_cuts_after_code() -> None:
    assert clean_reply("a <python>x=1", "stop") == ("a <python>x=1</python>", 0)
    assert clean_reply("a <python>x=1", "length") == ("a <python>x=1", 0)
    assert clean_reply("<python>1</python> then <python>2</python>", "stop") == (
        "<python>1</python>",
        0,
    )
    assert clean_reply("<state>made up", "stop") == ("", 1)


def test_dead_endpoint_fails_the_chunk_with_a_clear_error(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    with (
        FakeOpenAIServer(lambda _r: Fault.status(503)) as fake,
        pytest.raises(MathmillError, match=r"HTTP 503.*re-run the same command"),
    ):
        asyncio.run(tir(params=params(fake.base_url, tmp_path)))


def test_cli_debug_prints_turns(prefect_api: dict[str, str], tmp_path: Path) -> None:
    with FakeOpenAIServer(handler) as fake:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "mathmill", "run", "tir", "--limit", "1", "--debug"),
                *("--input", str(write_input(tmp_path / "in.jsonl"))),
                *("--base-url", fake.base_url, "--model", "fake", "--out", str(tmp_path / "run")),
            ],
            env={k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "LANG")}
            | prefect_api,
            capture_output=True,
            text=True,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "assistant" in done.stdout and "<repl>\n18\n</repl>" in done.stdout
    assert "success rate" in done.stdout and "sharegpt.jsonl" in done.stdout


def test_cli_missing_input_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mathmill", "run", "tir", "--input", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: input '{tmp_path / 'nope.jsonl'}' does not exist (a file, a directory or hf:NAME)"
    ]
