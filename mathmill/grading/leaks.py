"""Leak detection: flag solution code that hard-codes or string-matches the answer
instead of computing it (the AIMO pipeline's stage 5), by AST analysis.

>>> detect_leak("print(204)", "204").leak
True
>>> detect_leak("n = 17 * 12\\nprint(n)", "204").leak
False
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from fractions import Fraction

from mathmill.grading.normalize import normalize, parse_number

__all__ = ["LeakReport", "detect_leak"]

THRESHOLD = 0.6


@dataclass(frozen=True)
class LeakReport:
    """Whether the code looks hard-coded, a score in [0, 1], and the reasons."""

    leak: bool
    score: float
    reasons: list[str] = field(default_factory=list)


class _Answer:
    def __init__(self, answer: str) -> None:
        self.text, _ = normalize(answer)
        self.number = parse_number(self.text)

    def matches(self, value: object) -> bool:
        if isinstance(value, bool) or value is None:
            return False
        if isinstance(value, int | float):
            if self.number is None:
                return False
            try:
                return Fraction(value) == self.number or (
                    isinstance(value, float) and abs(value - float(self.number)) < 1e-9
                )
            except (OverflowError, ValueError):
                return False
        if isinstance(value, str):
            text, _ = normalize(value)
            return text == self.text and bool(text)
        return False

    @property
    def distinctive(self) -> bool:
        """A literal equal to a small integer appears in honest code all the time."""
        if self.number is None:
            return len(self.text) >= 2
        return self.number.denominator != 1 or abs(self.number) >= 100


def _is_print(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    )


def _computes(tree: ast.AST) -> bool:
    """Whether anything is computed: arithmetic, a loop, or a call other than print."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp | ast.For | ast.While | ast.comprehension | ast.AugAssign):
            return True
        if isinstance(node, ast.Call) and not _is_print(node):
            return True
    return False


def detect_leak(code: str, answer: str) -> LeakReport:
    """Score ``code`` for hard-coding ``answer``; ``leak`` when the score >= 0.6.

    Signals (weights combine as independent evidence): a printed or returned literal
    equal to the answer (0.95); printing a variable whose last assignment is that
    literal (0.9); a comparison against the answer (0.7); the answer as a string
    literal (0.6); the answer as a distinctive numeric literal (0.5); nothing computed
    at all (0.4).
    """
    target = _Answer(answer)
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return LeakReport(False, 0.0, [f"code does not parse: {e.msg} (line {e.lineno})"])
    signals: dict[str, float] = {}
    last_literal: dict[str, object] = {}  # name -> literal of its latest assignment, if any

    def literal_of(node: ast.AST | None) -> object | None:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = literal_of(node.operand)
            return -inner if isinstance(inner, int | float) else None
        if isinstance(node, ast.Name) and node.id in last_literal:
            return last_literal[node.id]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and target.matches(node.value):
            if isinstance(node.value, str):
                signals["the answer appears as a string literal"] = 0.6
            elif target.distinctive:
                signals["the answer appears as a numeric literal"] = 0.5
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(
                target.matches(literal_of(side)) for side in sides if isinstance(side, ast.Constant)
            ):
                signals["compares against the answer"] = 0.7
        if isinstance(node, ast.Return) and target.matches(literal_of(node.value)):
            signals["returns the answer as a literal"] = 0.95

    # Statement order matters for "assigned, then printed": walk bodies in order.
    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Assign):
                value = (
                    literal_of(stmt.value)
                    if isinstance(stmt.value, ast.Constant | ast.UnaryOp)
                    else None
                )
                for t in stmt.targets:
                    if isinstance(t, ast.Name):
                        if value is not None:
                            last_literal[t.id] = value
                        else:
                            last_literal.pop(t.id, None)
            elif isinstance(stmt, ast.AugAssign | ast.AnnAssign) and isinstance(
                stmt.target, ast.Name
            ):
                last_literal.pop(stmt.target.id, None)
            for node in (
                ast.walk(stmt)
                if not isinstance(stmt, ast.FunctionDef | ast.For | ast.While | ast.If)
                else []
            ):
                if _is_print(node):
                    args = node.args  # type: ignore[attr-defined]
                    for arg in args:
                        if isinstance(arg, ast.Constant) and target.matches(arg.value):
                            signals["prints the answer as a literal"] = 0.95
                        elif isinstance(arg, ast.Name) and target.matches(last_literal.get(arg.id)):
                            signals[f"prints {arg.id}, last assigned the answer literal"] = 0.9
                        elif isinstance(arg, ast.JoinedStr) and any(
                            target.matches(literal_of(getattr(v, "value", v)))
                            for v in arg.values
                            if isinstance(v, ast.Constant | ast.FormattedValue)
                        ):
                            signals["prints the answer inside a literal f-string"] = 0.95
            for child in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, child, None)
                if isinstance(inner, list) and not isinstance(stmt, ast.FunctionDef):
                    visit(inner)

    visit(tree.body)
    if not _computes(tree):
        signals["nothing is computed"] = 0.4
    remaining = 1.0
    for weight in signals.values():
        remaining *= 1.0 - weight
    score = round(1.0 - remaining, 4)
    reasons = [
        f"{reason} ({weight:g})"
        for reason, weight in sorted(signals.items(), key=lambda kv: -kv[1])
    ]
    return LeakReport(score >= THRESHOLD, score, reasons)
