"""What runs inside a sandboxed process: execute code, describe the session state.

Everything here runs after isolation is in place (it may run user ``__repr__``s).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import itertools
import sys
import traceback
import types
from typing import Any

__all__ = ["describe_state", "fresh_randomness", "new_namespace", "run_code"]

_REPR_CHARS = 80
_DICT_KEYS = 5


def fresh_randomness() -> None:
    """Reseed ``random`` and numpy's global generator from the OS.

    A job or session is a clone of the zygote, so without this every one starts from
    the zygote's generator states: the same "random" numbers in every job.
    """
    import os
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # 128 bits from the OS (seed() without one reads far more)
        numpy.random.seed(numpy.frombuffer(os.urandom(16), dtype=numpy.uint32))


def new_namespace() -> dict[str, Any]:
    """A fresh ``__main__``-like namespace for user code."""
    return {"__name__": "__main__", "__builtins__": __builtins__}


def run_code(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute ``code`` in ``namespace`` like a REPL cell (a final expression's repr is
    printed). Returns ``{"status": ok|error|memory, "exit_code", "exception"}``;
    tracebacks go to stderr.
    """
    sys.set_int_max_str_digits(0)
    try:
        tree = ast.parse(code, "<sandbox>", "exec")
    except SyntaxError:
        traceback.print_exc(limit=0)
        return {"status": "error", "exit_code": 1, "exception": "SyntaxError"}
    last: ast.Expression | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)  # type: ignore[attr-defined]
    try:
        exec(compile(tree, "<sandbox>", "exec", dont_inherit=True), namespace)
        if last is not None:
            value = eval(compile(last, "<sandbox>", "eval", dont_inherit=True), namespace)
            if value is not None:
                sys.stdout.write(repr(value) + "\n")
    except MemoryError:
        _print_exc()
        return {"status": "memory", "exit_code": 1, "exception": "MemoryError"}
    except SystemExit as e:
        code_ = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return {"status": "ok" if code_ == 0 else "error", "exit_code": code_, "exception": None}
    except BaseException as e:
        _print_exc()
        return {"status": "error", "exit_code": 1, "exception": type(e).__name__}
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    return {"status": "ok", "exit_code": 0, "exception": None}


def _print_exc() -> None:
    etype, value, tb = sys.exc_info()
    # Drop our own frame so the traceback starts at the user's code.
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    with contextlib.suppress(OSError, MemoryError):
        traceback.print_exception(etype, value, tb)


def _short_repr(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and not isinstance(value, type):
        return f"{type(value).__name__}{list(shape)}"
    if isinstance(value, list | tuple | set | frozenset | dict):
        return f"{type(value).__name__}[{len(value)}]"
    try:
        text = repr(value)
    except Exception as e:
        text = f"<repr failed: {type(e).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


def _describe_variable(name: str, value: Any) -> dict[str, Any]:
    """A variable's type and short repr, plus ``len`` of a container (and a dict's first
    keys) or ``shape`` of an array-like, for clients that show those instead.
    """
    info: dict[str, Any] = {"name": name, "type": type(value).__name__, "repr": _short_repr(value)}
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and not isinstance(value, type):
        if all(isinstance(d, int) for d in shape):
            info["shape"] = [int(d) for d in shape]
    elif isinstance(value, list | tuple | set | frozenset | dict):
        info["len"] = len(value)
        if isinstance(value, dict):
            first = itertools.islice(value, _DICT_KEYS)
            info["keys"] = [k if isinstance(k, str) else _short_repr(k) for k in first]
    return info


def describe_state(namespace: dict[str, Any], baseline: set[str] | None = None) -> dict[str, Any]:
    """The session's state: imports, variables (type and short repr or shape; ``len``,
    ``keys`` and ``shape`` where they apply), functions with signatures, classes with
    methods, and a one-line summary.
    """
    skip = baseline or set()
    imports: list[str] = []
    variables: list[dict[str, str]] = []
    functions: list[dict[str, str]] = []
    classes: list[dict[str, Any]] = []
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in skip:
            continue
        if isinstance(value, types.ModuleType):
            imports.append(name if value.__name__ == name else f"{value.__name__} as {name}")
        elif inspect.isclass(value):
            methods = [m for m, v in vars(value).items() if callable(v) and not m.startswith("__")]
            classes.append({"name": name, "methods": methods})
        elif inspect.isfunction(value) or inspect.isbuiltin(value):
            try:
                signature = str(inspect.signature(value))
            except (TypeError, ValueError):
                signature = "(...)"
            functions.append({"name": name, "signature": signature})
        else:
            variables.append(_describe_variable(name, value))
    parts = []
    if imports:
        parts.append("imports: " + ", ".join(imports))
    if variables:
        parts.append("vars: " + ", ".join(f"{v['name']}={v['repr']}" for v in variables))
    if functions:
        parts.append("funcs: " + ", ".join(f"{f['name']}{f['signature']}" for f in functions))
    if classes:
        parts.append("classes: " + ", ".join(c["name"] for c in classes))
    return {
        "imports": imports,
        "variables": variables,
        "functions": functions,
        "classes": classes,
        "summary": " | ".join(parts) if parts else "(empty)",
    }
