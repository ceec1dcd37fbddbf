"""tir resume: ``kill -9`` of ``mathmill run tir`` halfway, then the same command again,
pays for no finished LLM call twice and writes what an uninterrupted run writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from mathmill.llm.fake_server import FakeOpenAIServer, Fault, RecordedRequest, Reply, Response
from tests.resume_support import kill_9_midway, run_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROBLEMS = 12


class Solver:
    """Each problem: compute in two code turns (state carried), then answer."""

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.served: Counter[str] = Counter()
        self.answered = 0
        self.lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> Response:
        if self.paused.is_set():
            return Fault.hang(120.0)
        body = request.body or {}
        messages = body.get("messages", [])
        n = int(messages[1]["content"].split()[1].rstrip(":"))
        turn = sum(1 for m in messages if m["role"] == "assistant")
        replies = [
            f"<python>\nx = {n} * 3\n",
            "<python>\nprint(x + 1)\n",
            f"<final_answer>\\boxed{{{n * 3 + 1}}}</final_answer>",
        ]
        with self.lock:
            self.answered += 1
            self.served[json.dumps(body, sort_keys=True)] += 1
        return Reply(replies[min(turn, 2)], delay_s=0.05)


def write_input(path: Path) -> Path:
    rows = [
        {"id": f"p{n}", "problem": f"Problem {n}: 3n+1?", "answer": str(3 * n + 1)}
        for n in range(PROBLEMS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(base_url: str, data: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "mathmill", "run", "tir", "--input", str(data)),
        *("--out", str(out), "--base-url", base_url, "--model", "fake"),
        *("--concurrency", "3", "--max-turns", "4"),
    ]


def exported(out: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (out / "sharegpt.jsonl").read_text().splitlines()]
    for row in rows:
        meta = row["metadata"]
        assert isinstance(meta, dict)
        meta.pop("attempt_id")  # derived from the same inputs, but keep the check on content
    return sorted(rows, key=lambda r: str(r["id"]))


def test_kill_9_then_resume(prefect_api: dict[str, str], tmp_path: Path) -> None:
    data = write_input(tmp_path / "in.jsonl")
    with FakeOpenAIServer(Solver()) as fake:
        whole = subprocess.run(
            command(fake.base_url, data, tmp_path / "whole"),
            env=run_env(prefect_api),
            capture_output=True,
            text=True,
        )
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = exported(tmp_path / "whole")
    assert len(expected) == PROBLEMS and all(
        r["metadata"]["verdict"] == "correct" for r in expected
    )  # type: ignore[index]

    solver = Solver()
    with FakeOpenAIServer(solver) as fake:
        kill_9_midway(
            command(fake.base_url, data, tmp_path / "run"),
            run_env(prefect_api),
            ready=lambda: solver.answered >= PROBLEMS * 3 // 2,  # about half the calls
            paused=solver.paused,
        )
        resumed = subprocess.run(
            command(fake.base_url, data, tmp_path / "run"),
            env=run_env(prefect_api),
            capture_output=True,
            text=True,
        )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {k: v for k, v in solver.served.items() if v > 1} == {}
    assert exported(tmp_path / "run") == expected
    usage = json.loads((tmp_path / "run" / "manifest.json").read_text())["result"]["usage"]
    assert usage["total"]["cached"] > 0  # the killed run's finished turns were replayed
