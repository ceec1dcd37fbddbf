"""The command line, run as a user runs it: a real process, real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from mathmill.llm.fake_server import FakeOpenAIServer, Fault, Reply

CLI = [sys.executable, "-m", "mathmill"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MATHMILL_", "OPENAI_"))}
    full_env.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_help_lists_the_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "endpoint", "version"):
        assert command in out.stdout


def test_endpoint_check_against_fake_server() -> None:
    def handler(request: object) -> Reply:
        body = getattr(request, "body", {}) or {}
        return Reply('{"answer": 5}' if "response_format" in body else "pong")

    with FakeOpenAIServer(handler, model="fake-model") as fake:
        out = run("endpoint", "check", "--base-url", fake.base_url, "--model", "fake-model")
        paths = [r.path for r in fake.requests]
    assert out.returncode == 0, out.stderr
    assert "fake-model" in out.stdout
    assert "pong" in out.stdout
    assert "structured output  yes: json_schema parsed" in out.stdout
    assert "OK" in out.stdout
    assert paths == ["/v1/chat/completions", "/v1/chat/completions"]


def test_endpoint_check_discovers_the_model_and_reads_the_key_from_env() -> None:
    with FakeOpenAIServer(lambda _r: Reply('{"answer": 5}'), model="served-model") as fake:
        out = run(
            "endpoint",
            "check",
            "--base-url",
            fake.base_url,
            "--api-key-env",
            "MY_KEY",
            env={"MY_KEY": "sk-from-env"},
        )
        auth = {r.headers.get("authorization") for r in fake.requests}
    assert out.returncode == 0, out.stderr
    assert "served-model" in out.stdout
    assert auth == {"Bearer sk-from-env"}
    assert "sk-from-env" not in out.stdout + out.stderr


def test_endpoint_check_reports_when_structured_output_does_not_work() -> None:
    with FakeOpenAIServer(lambda _r: Reply("no json, sorry")) as fake:
        out = run("endpoint", "check", "--base-url", fake.base_url, "--model", "m")
        strict = run(
            "endpoint",
            "check",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--require-structured",
        )
    assert out.returncode == 0
    assert "structured output  no" in out.stdout
    assert strict.returncode == 1
    assert "structured output does not work" in strict.stderr


def test_endpoint_check_dead_port_fails_fast_with_one_line() -> None:
    start = time.monotonic()
    out = run(
        "endpoint", "check", "--base-url", f"http://127.0.0.1:{dead_port()}/v1", "--model", "m"
    )
    assert out.returncode == 1
    assert time.monotonic() - start < 30
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    assert "cannot connect" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.status(500), "HTTP 500 after 2 attempts"),
        (Fault.status(401), "HTTP 401 after 1 attempt"),
        (Fault.malformed(), "invalid response after 2 attempts"),
        (Fault.hang(30), "no answer within 1s after 2 attempts"),
    ],
    ids=["500", "401", "malformed", "hang"],
)
def test_endpoint_check_faulty_server_fails_with_a_clear_message(
    fault: Fault, message: str
) -> None:
    with FakeOpenAIServer(lambda _r: fault) as fake:
        out = run(
            "endpoint", "check", "--base-url", fake.base_url, "--model", "m", "--timeout", "1"
        )
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: ")
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_bad_option_is_a_usage_error_not_a_traceback() -> None:
    out = run("demo", "--topics", "0")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "topics" in out.stderr
