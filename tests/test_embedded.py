"""The embedded default model: a real llama.cpp server on loopback (slow)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mathmill.errors import EmbeddedModelError
from mathmill.llm import LLMPool
from mathmill.llm.embedded import EMBEDDED_MODEL, EmbeddedModel, find_gguf, resolve_endpoint
from mathmill.records import SamplingParams
from mathmill.storage import RunStore

pytestmark = pytest.mark.slow


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATHMILL_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, "-m", "mathmill", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
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


def test_demo_on_embedded_model_writes_a_readable_run(tmp_path: Path) -> None:
    out = cli("demo", "--out", str(tmp_path), "--limit", "2", "--max-tokens", "96")
    assert out.returncode == 0, out.stderr
    (run_dir,) = list(tmp_path.iterdir())
    store = RunStore(str(run_dir))
    assert store.datasets() == ["attempts", "problems"]
    attempts = store.dataset("attempts").read_all()
    problems = {p.id: p for p in store.dataset("problems").read_all()}
    assert len(attempts) == 2
    assert len(problems) == 2
    for attempt in attempts:
        assert attempt.problem_id in problems
        assert attempt.model == EMBEDDED_MODEL
        assert attempt.text
        assert attempt.usage.completion_tokens > 0
        assert attempt.prompt is not None
        assert attempt.verdict is not None or attempt.error is not None
    assert "LLM usage" in out.stdout
    assert str(run_dir) in out.stdout
