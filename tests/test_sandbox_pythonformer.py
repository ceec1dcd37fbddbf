"""An unmodified Pythonformer REPL client against ``mathmill sandbox serve`` (TCP and a
Unix socket), the native shape kept for mathmill's own client, and the field mapping.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mathmill.records import ExecutionResult
from mathmill.sandbox import pythonformer as pf
from mathmill.sandbox.protocol import SessionResult, SessionState
from tests.sandbox_support import pythonformer_session_script, sandbox_server

pytestmark = pytest.mark.slow

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with (
        sandbox_server([sys.executable], ENV, timeout_s=2) as base,
        httpx.Client(base_url=base, timeout=120) as client,
    ):
        yield client


def test_pythonformer_client_over_tcp(http: httpx.Client) -> None:
    pythonformer_session_script(http)


def test_pythonformer_client_over_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "sandbox.sock"
    transport = httpx.HTTPTransport(uds=str(sock))
    with (
        sandbox_server([sys.executable], ENV, timeout_s=2, uds=sock) as base,
        httpx.Client(base_url=base, transport=transport, timeout=120) as client,
    ):
        pythonformer_session_script(client)


def test_native_header_gives_mathmill_shape(http: httpx.Client) -> None:
    native = {pf.SHAPE_HEADER: pf.NATIVE}
    sid = http.post("/session/create").json()["session_id"]
    data = http.post(
        f"/session/{sid}/execute", json={"code": "import sympy\nr = [1, 2]"}, headers=native
    ).json()
    turn = SessionResult.model_validate(data)  # extra="forbid": no Pythonformer fields
    assert turn.state is not None and turn.state.variables[0].len == 2
    state = SessionState.model_validate(http.get(f"/session/{sid}/state", headers=native).json())
    assert state.summary == "imports: sympy | vars: r=list[2]"
    assert "state" not in http.get(f"/session/{sid}/state", headers=native).json()
    once = http.post("/execute", json={"code": "print(1)", "timeout": 5}, headers=native)
    assert ExecutionResult.model_validate(once.json()).stdout == "1\n"
    missing = http.delete("/session/0-nope", headers=native)
    assert missing.status_code == 404 and set(missing.json()) == {"detail"}
    http.delete(f"/session/{sid}")


def _result(**fields: object) -> ExecutionResult:
    return ExecutionResult.model_validate({"status": "ok", **fields})


def test_error_texts() -> None:
    traceback = (
        'Traceback (most recent call last):\n  File "<sandbox>", line 1, in <module>\n'
        "    raise ValueError('a')\nValueError: a\n  b\n"
    )
    failed = _result(status="error", stderr="note\n" + traceback, exit_code=1)
    fields = pf.result_fields(failed)
    assert fields["error"] == "ValueError: a\n  b" and not fields["success"]
    assert fields["output"] == "\n[stderr]: note\n\n[error]: ValueError: a\n  b\n" + traceback
    syntax = '  File "<sandbox>", line 1\n    x = (\n        ^\nSyntaxError: bad\n'
    assert pf.short_error(_result(status="error", stderr=syntax)) == "SyntaxError: bad"
    assert pf.short_error(_result(status="error", exit_code=3)) == "SystemExit: 3"
    timeout = _result(status="timeout", wall_ms=2000.4)
    assert pf.result_fields(timeout, 2.0)["error"] == "Execution timed out after 2 seconds"
    assert pf.result_fields(timeout)["execution_time_ms"] == 2000
    assert pf.short_error(_result(status="memory")) == "MemoryError: memory limit exceeded"
    assert pf.short_error(_result(status="crashed", exit_code=-11)) == "Process crashed (signal 11)"
    cut = pf.result_fields(_result(status="output_limit", stdout="x", stdout_truncated=True))
    assert cut["truncated"] and cut["error"].startswith("Output limit exceeded")
    ok = pf.result_fields(_result(stdout="1\n", stderr="warn\n", wall_ms=1.6))
    assert ok == {
        "success": True,
        "output": "1\n\n[stderr]: warn\n",
        "error": None,
        "truncated": False,
        "execution_time_ms": 2,
    }


def test_state_snapshot_and_formatting() -> None:
    state = SessionState.model_validate(
        {
            "imports": ["sympy", "numpy as np"],
            "variables": [
                {"name": "x", "type": "Symbol", "repr": "x"},
                {"name": "m", "type": "ndarray", "repr": "ndarray[3]", "shape": [3]},
                {"name": "d", "type": "dict", "repr": "dict[1]", "len": 1, "keys": ["a"]},
            ],
            "functions": [{"name": "f", "signature": "(n)"}],
            "classes": [{"name": "A", "methods": ["m"]}],
            "summary": "native summary",
        }
    )
    snapshot = pf.state_snapshot(state)
    assert snapshot == {
        "variables": {
            "x": {"type": "Symbol", "value": "x"},
            "m": {"type": "ndarray", "shape": "(3,)"},
            "d": {"type": "dict", "len": 1, "keys": ["a"]},
        },
        "functions": {"f": "def f(n)"},
        "classes": {"A": {"name": "A", "methods": ["m"], "bases": []}},
        "modules": ["sympy", "np"],
        "imports": ["sympy", "numpy as np"],
        "summary": "native summary",
    }
    assert pf.format_state(snapshot) == (
        "imports: sympy, np | functions: def f(n) | classes: class A [m]"
        " | vars: x=x, m: ndarray((3,)), d: dict[1]"
    )
    assert pf.format_state(pf.state_snapshot(None)) == "(empty state)"
    assert pf.wants_native(" Native ") and not pf.wants_native(None)
