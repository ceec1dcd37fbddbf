"""Test material for leak detection: correct solution code built from GSM8K's
calculator annotations, and hard-coded mutations of it.

A GSM8K solution marks each computation as ``<<16-3-4=9>>``; each becomes a line
``v1 = 16 - 3 - 4``, later numbers equal to an earlier result become that variable,
and the last one is printed. Rows whose last computation is not the answer are
skipped, so every clean solution is correct.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from fractions import Fraction

__all__ = ["MUTATIONS", "gsm8k_solution_code"]

_CALC = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_NUM = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])")


def _value(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_solution_code(solution: str, answer: str) -> str | None:
    """Python code computing ``answer`` from a GSM8K solution, or None."""
    steps = _CALC.findall(solution)
    if not steps:
        return None
    lines: list[str] = []
    results: list[tuple[Fraction, str]] = []
    for i, (expr, result) in enumerate(steps, 1):
        expr = expr.replace("x", "*").replace("^", "**").strip()

        def name_for(m: re.Match[str]) -> str:
            value = _value(m.group(1))
            for known, name in reversed(results):
                if value is not None and known == value:
                    return name
            return m.group(1)

        expr = _NUM.sub(name_for, expr)
        try:
            ast.parse(expr, mode="eval")
        except SyntaxError:
            return None
        value = _value(result)
        if value is None:
            return None
        lines.append(f"v{i} = {expr}")
        results.append((value, f"v{i}"))
    final = _value(answer)
    if final is None or results[-1][0] != final:
        return None
    lines.append(f"print(round(v{len(steps)}, 6))")
    return "\n".join(lines)


def _hard_print(code: str, answer: str) -> str:
    return "\n".join([*code.splitlines()[:-1], f"print({answer})"])


def _override(code: str, answer: str) -> str:
    body = code.splitlines()[:-1]
    return "\n".join([*body, f"answer = {answer}", "print(answer)"])


def _string(code: str, answer: str) -> str:
    return "\n".join([*code.splitlines()[:-1], f'print("{answer}")'])


def _function(code: str, answer: str) -> str:
    return f"def solve():\n    return {answer}\n\n\nprint(solve())"


def _search(code: str, answer: str) -> str:
    return f"for n in range(10**7):\n    if str(n) == '{answer}':\n        print(n)\n        break"


def _fstring(code: str, answer: str) -> str:
    return "\n".join([*code.splitlines()[:-1], f'print(f"{answer}")'])


MUTATIONS: dict[str, Callable[[str, str], str]] = {
    "hard_print": _hard_print,
    "override": _override,
    "string": _string,
    "function": _function,
    "search": _search,
    "fstring": _fstring,
}
"""Hard-coding mutations: each turns a correct solution into one that does not compute."""
