"""The Pythonformer REPL server's answer shape, next to mathmill's own.

Clients written for the Pythonformer REPL server (``REPLClient`` in
marketagents-ai/MarketDataGenie, ``datagenie/pythonformer/repl_client.py``) read
``success``, ``output``, ``error``, ``truncated``, ``execution_time_ms``, ``state`` and
``state_formatted``. mathmill's own answers are ``ExecutionResult``, ``SessionResult``
and ``SessionState``. The server answers both ways:

* A request with the header ``X-Mathmill-Shape: native`` (what :class:`HTTPSandbox`
  sends) gets mathmill's models exactly.
* Any other request gets the *compatible* shape: the native fields plus the
  Pythonformer fields. On a name clash the native field stays, except for ``state``,
  which becomes Pythonformer's snapshot (with the native ``imports`` and ``summary``
  added to it, since those names do not clash).

Fields added in the compatible shape:

* ``success``: ``status == "ok"``.
* ``output``: stdout; then ``\n[stderr]: ...`` with stderr other than the traceback;
  then, when the run failed, ``\n[error]: <error>`` and the traceback.
* ``error``: ``None`` on success, else a short text: the exception line(s)
  (``ZeroDivisionError: division by zero``), ``Execution timed out after N seconds``,
  ``MemoryError: memory limit exceeded``, ``Output limit exceeded: ...``,
  ``Process crashed (signal N)``.
* ``truncated``: ``stdout_truncated or stderr_truncated``.
* ``execution_time_ms``: ``wall_ms`` rounded to an int.
* ``state`` (session turns and ``GET /session/{id}/state``):
  ``{"variables": {name: {"type", "value"}}`` (or ``"len"`` and, for a dict, ``"keys"``;
  or ``"shape"``), ``"functions": {name: "def f(sig)"}``,
  ``"classes": {name: {"name", "methods", "bases"}}``, ``"modules": [name, ...]}``,
  plus the native ``imports`` and ``summary``.
* ``state_formatted``: e.g. ``imports: sympy | vars: x=x, result: list[2]``, or
  ``(empty state)``.
* ``variables`` (session turns only; the state endpoint keeps the native list):
  ``{name: "int: 3"}``, ``"list: len=2"``, ``"ndarray"``.

``GET /health`` adds ``status`` (``healthy``) and ``active_sessions``; error answers
add ``error`` next to ``detail``. ``/session/create``, ``/reset`` and ``DELETE`` answer
the same in both shapes (Pythonformer clients read only ``session_id``).

Everything here formats a state that was built inside the sandbox
(:mod:`mathmill.sandbox.guest`); no user code runs in the server.
"""

from __future__ import annotations

from typing import Any

from mathmill.records import ExecutionResult
from mathmill.sandbox.protocol import SessionResult, SessionState, VariableInfo

__all__ = [
    "NATIVE",
    "SHAPE_HEADER",
    "error_answer",
    "execute_answer",
    "format_state",
    "health_answer",
    "result_fields",
    "session_execute_answer",
    "short_error",
    "state_answer",
    "state_snapshot",
    "wants_native",
]

SHAPE_HEADER = "X-Mathmill-Shape"
NATIVE = "native"

_TRACEBACK = "Traceback (most recent call last):"
_SYNTAX_FRAME = '  File "<sandbox>", line '
_ERROR_CHARS = 2000
_CLASS_METHODS = 10
_FORMAT_METHODS = 5


def wants_native(header: str | None) -> bool:
    """Whether the ``X-Mathmill-Shape`` header asks for mathmill's own shape."""
    return (header or "").strip().lower() == NATIVE


def _split_traceback(stderr: str) -> tuple[str, str]:
    """``(other stderr, traceback)``: the traceback starts at its first header line
    (or, for a SyntaxError, which has none, at its last ``File "<sandbox>"`` line).
    """
    lines = stderr.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == _TRACEBACK]
    if not starts:
        starts = [i for i, line in enumerate(lines) if line.startswith(_SYNTAX_FRAME)][-1:]
    if not starts:
        return stderr, ""
    return "".join(lines[: starts[0]]), "".join(lines[starts[0] :])


def _exception_text(traceback: str) -> str | None:
    """The exception line(s) that end a traceback, e.g. ``ValueError: boom``: what follows
    the last ``File`` line and its source and caret lines.
    """
    lines = [line for line in traceback.rstrip("\n").splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    start = frames[-1] + 1 if frames else len(lines) - 1
    while start < len(lines) and lines[start].startswith("    "):
        start += 1
    text = "\n".join(lines[start:] or lines[-1:]).strip()
    return text[:_ERROR_CHARS] or None


def short_error(result: ExecutionResult, timeout_s: float | None = None) -> str | None:
    """Pythonformer's ``error``: ``None`` when the run succeeded, else a short text."""
    if result.status == "ok":
        return None
    if result.status == "timeout":
        limit = f" after {timeout_s:g} seconds" if timeout_s else ""
        return f"Execution timed out{limit}"
    if result.status == "memory":
        return "MemoryError: memory limit exceeded"
    if result.status == "output_limit":
        return "Output limit exceeded: the run was stopped"
    if result.status == "crashed":
        code = result.exit_code
        how = "" if code is None else f" (signal {-code})" if code < 0 else f" (exit code {code})"
        return f"Process crashed{how}"
    _, traceback = _split_traceback(result.stderr)
    text = _exception_text(traceback) if traceback else None
    return text or f"SystemExit: {result.exit_code}"


def _output(result: ExecutionResult, error: str | None) -> str:
    """Pythonformer's ``output``: stdout, then other stderr, then the error block."""
    text = result.stdout
    other, traceback = _split_traceback(result.stderr) if error else (result.stderr, "")
    if other:
        text += f"\n[stderr]: {other}"
    if error:
        text += f"\n[error]: {error}"
        if traceback:
            text += f"\n{traceback}"
    return text


def result_fields(result: ExecutionResult, timeout_s: float | None = None) -> dict[str, Any]:
    """``success``, ``output``, ``error``, ``truncated`` and ``execution_time_ms`` of a
    result (``timeout_s``: the limit it ran under, named in a timeout's error).
    """
    error = short_error(result, timeout_s)
    return {
        "success": result.status == "ok",
        "output": _output(result, error),
        "error": error,
        "truncated": result.stdout_truncated or result.stderr_truncated,
        "execution_time_ms": round(result.wall_ms),
    }


def _variable(info: VariableInfo) -> dict[str, Any]:
    if info.shape is not None:
        return {"type": info.type, "shape": str(tuple(info.shape))}
    if info.len is not None:
        found: dict[str, Any] = {"type": info.type, "len": info.len}
        if info.keys is not None:
            found["keys"] = info.keys
        return found
    return {"type": info.type, "value": info.repr}


def state_snapshot(state: SessionState | None) -> dict[str, Any]:
    """Pythonformer's ``state`` (variables, functions, classes, modules), plus the native
    ``imports`` and ``summary``.
    """
    state = state or SessionState()
    return {
        "variables": {v.name: _variable(v) for v in state.variables},
        "functions": {f.name: f"def {f.name}{f.signature}" for f in state.functions},
        "classes": {
            c.name: {"name": c.name, "methods": c.methods[:_CLASS_METHODS], "bases": []}
            for c in state.classes
        },
        "modules": [name.rpartition(" as ")[2] for name in state.imports],
        "imports": state.imports,
        "summary": state.summary,
    }


def format_state(snapshot: dict[str, Any]) -> str:
    """Pythonformer's ``state_formatted``: one line from a :func:`state_snapshot`."""
    parts = []
    if snapshot["modules"]:
        parts.append("imports: " + ", ".join(snapshot["modules"]))
    if snapshot["functions"]:
        parts.append("functions: " + "; ".join(snapshot["functions"].values()))
    if snapshot["classes"]:
        shown = []
        for name, info in snapshot["classes"].items():
            bases = f"({', '.join(info['bases'])})" if info["bases"] else ""
            methods = info["methods"][:_FORMAT_METHODS]
            shown.append(f"class {name}{bases}" + (f" [{', '.join(methods)}]" if methods else ""))
        parts.append("classes: " + "; ".join(shown))
    if snapshot["variables"]:
        shown = []
        for name, info in snapshot["variables"].items():
            if "value" in info:
                shown.append(f"{name}={info['value']}")
            elif "shape" in info:
                shown.append(f"{name}: {info['type']}({info['shape']})")
            else:
                shown.append(f"{name}: {info['type']}[{info['len']}]")
        parts.append("vars: " + ", ".join(shown))
    return " | ".join(parts) if parts else "(empty state)"


def _variables_summary(state: SessionState | None) -> dict[str, str]:
    """Pythonformer's top-level ``variables``: ``{name: "type: repr"}`` and the like."""
    summary = {}
    for v in (state or SessionState()).variables:
        if v.len is not None:
            summary[v.name] = f"{v.type}: len={v.len}"
        elif v.shape is not None:
            summary[v.name] = v.type
        else:
            summary[v.name] = f"{v.type}: {v.repr}"
    return summary


def execute_answer(result: ExecutionResult, timeout_s: float | None = None) -> dict[str, Any]:
    """The compatible answer of ``POST /execute``."""
    return {**result.model_dump(mode="json"), **result_fields(result, timeout_s)}


def session_execute_answer(result: SessionResult, timeout_s: float | None = None) -> dict[str, Any]:
    """The compatible answer of ``POST /session/{id}/execute``."""
    snapshot = state_snapshot(result.state)
    return {
        **result.model_dump(mode="json"),
        **result_fields(result, timeout_s),
        "variables": _variables_summary(result.state),
        "state": snapshot,
        "state_formatted": format_state(snapshot),
    }


def state_answer(session_id: str, state: SessionState) -> dict[str, Any]:
    """The compatible answer of ``GET /session/{id}/state`` (the native ``variables``
    list stays; Pythonformer clients read ``state`` and ``state_formatted``).
    """
    snapshot = state_snapshot(state)
    return {
        **state.model_dump(mode="json"),
        "session_id": session_id,
        "state": snapshot,
        "state_formatted": format_state(snapshot),
    }


def health_answer(health: dict[str, Any]) -> dict[str, Any]:
    """The compatible answer of ``GET /health``."""
    return {
        **health,
        "status": "healthy" if health.get("ok") else "unhealthy",
        "active_sessions": health.get("sessions", 0),
    }


def error_answer(message: str, native: bool) -> dict[str, Any]:
    """An error body: ``detail``, plus Pythonformer's ``error`` unless ``native``."""
    return {"detail": message} if native else {"detail": message, "error": message}
