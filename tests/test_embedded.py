"""The embedded default model: a real llama.cpp server on loopback (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mathmill.errors import EmbeddedModelError
from mathmill.grading import extract_answer
from mathmill.llm import LLMPool
from mathmill.llm.embedded import EMBEDDED_MODEL, EmbeddedModel, find_gguf, resolve_endpoint
from mathmill.records import Attempt, Problem, SamplingParams, SolutionRow
from mathmill.storage import RunStore

pytestmark = pytest.mark.slow


def cli(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MATHMILL_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, "-m", "mathmill", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean | (env or {}),
    )


def test_model_file_ships_in_a_wheel() -> None:
    path = find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_server_starts_answers_and_stops_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    model = EmbeddedModel()
    with model as endpoint:
        assert endpoint.model == EMBEDDED_MODEL
        assert endpoint.max_concurrency == 1
        assert model.process is not None
        environ = Path(f"/proc/{model.process.pid}/environ").read_bytes()
        assert b"sk-must-not-leak" not in environ
        assert b"OPENAI_API_KEY" not in environ

        async def ask() -> tuple[str, int]:
            async with LLMPool() as pool:
                result = await pool.client(endpoint).chat(
                    [{"role": "user", "content": "Say hello."}],
                    sampling=SamplingParams(temperature=0.0, max_tokens=8),
                )
                return result.text, result.usage.completion_tokens

        text, tokens = asyncio.run(ask())
        assert text.strip()
        assert 0 < tokens <= 8
        process = model.process
    assert process.poll() is not None  # stopped on exit


def test_configured_endpoint_wins_over_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHMILL_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("MATHMILL_MODEL", "remote")
    with resolve_endpoint() as endpoint:
        assert endpoint.base_url == "http://127.0.0.1:1/v1"
        assert endpoint.model == "remote"


def test_missing_model_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHMILL_EMBEDDED_GGUF", "/nonexistent/model.gguf")
    with pytest.raises(EmbeddedModelError, match=r"model file /nonexistent/model\.gguf is missing"):
        EmbeddedModel().start()


def test_endpoint_check_against_embedded_model() -> None:
    out = cli("endpoint", "check")
    assert out.returncode == 0, out.stderr
    assert EMBEDDED_MODEL in out.stdout
    assert "structured output  yes: json_object" in out.stdout


def test_demo_runs_synthesize_on_the_embedded_model(
    tmp_path: Path, prefect_api: dict[str, str]
) -> None:
    """The tiny model's solutions mostly fail; each must fail for the reason it has."""
    run_dir = tmp_path / "demo"
    out = cli("demo", "--out", str(run_dir), "--max-tokens", "160", env=prefect_api)
    assert out.returncode == 0, out.stderr[-3000:]
    store = RunStore(str(run_dir))
    problems = store.dataset("problems").read_all(Problem)
    attempts = store.dataset("attempts").read_all(Attempt)
    rows = [
        *store.dataset("verified").read_all(SolutionRow),
        *store.dataset("unverified").read_all(SolutionRow),
    ]
    assert problems, "the embedded model wrote no problem"
    assert len(rows) == 2 * len(problems)  # one long and one short CoT each
    by_id = {a.id: a for a in attempts}
    for row in rows:
        last = by_id[row.lineage[-1]]
        assert last.model == EMBEDDED_MODEL
        assert last.verdict is not None and last.verdict.status == row.status
        if row.status == "no_answer":
            # Any text the model may write (an empty \boxed{} included): the extractor
            # found no answer in it, which is what no_answer means.
            assert last.final_answer is None
            assert extract_answer(last.text, number_fallback=False) is None
        elif row.status == "no_code":
            assert last.code is None and last.draft_code is None
        elif row.status in ("wrong_answer", "verified", "leak", "disagreement", "minority"):
            assert last.execution is not None and last.execution.status == "ok"
            assert row.computed_answer is not None
        elif row.status in ("error", "timeout", "no_output"):
            assert last.execution is not None and last.code
        else:
            assert row.status == "llm_error" and last.error is not None
    report = (run_dir / "report.md").read_text()
    assert "## Rows by stage and outcome" in report
    assert f"run directory: {run_dir}" in out.stdout
    assert "report.md" in out.stdout
    again = cli("demo", "--out", str(run_dir), "--max-tokens", "160", env=prefect_api)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["result"]["stages"]
    assert all(s["reused"] == s["chunks"] for s in stages.values())  # resumed, not redone


def test_tir_on_the_embedded_model_over_five_gsm8k_problems(
    tmp_path: Path, prefect_api: dict[str, str]
) -> None:
    """The tiny model rarely follows the tag format; every trajectory must still end
    with a verdict that fits what happened, and the stats must add up.
    """
    data = Path(__file__).parent / "data" / "gsm8k_5.jsonl"
    out = cli(
        *("run", "tir", "--input", str(data), "--limit", "5", "--out", str(tmp_path / "tir")),
        *("--max-turns", "2", "--max-tokens", "96"),
        env=prefect_api,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "tir" / "manifest.json").read_text())
    stats = manifest["result"]["stats"]
    assert stats["processed"] == 5
    assert stats["successful"] + stats["failed"] == 5
    assert stats["correct"] + stats["incorrect"] == stats["successful"]
    attempts = RunStore(str(tmp_path / "tir")).dataset("trajectories").read_all(Attempt)
    assert len(attempts) == 5
    for a in attempts:
        assert a.verdict is not None and a.model == EMBEDDED_MODEL
        if a.verdict.status == "failed":
            assert (
                a.final_answer is None and "no final answer after 2 model turns" in a.verdict.reason
            )
        else:
            assert a.final_answer is not None and a.metadata["num_code_blocks"]
    assert "tir statistics" in out.stdout and "success rate" in out.stdout
