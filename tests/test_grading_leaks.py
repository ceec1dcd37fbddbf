"""Leak detection: hand-written cases and mutations of real GSM8K solutions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathmill.grading.leaks import detect_leak
from mathmill.grading.mutations import MUTATIONS, gsm8k_solution_code

DATA = Path(__file__).parent / "data" / "gsm8k_test.jsonl"


@pytest.mark.parametrize(
    ("code", "answer", "leak", "reason"),
    [
        ("print(204)", "204", True, "prints the answer as a literal"),
        (
            "x = 17 * 12\nx = 204\nprint(x)",
            "204",
            True,
            "prints x, last assigned the answer literal",
        ),
        ("def solve():\n    return 204\nprint(solve())", "204", True, "returns the answer"),
        (
            "for n in range(10**6):\n    if str(n) == '204':\n        print(n)",
            "204",
            True,
            "compares against the answer",
        ),
        ("print(f'{204}')", "204", True, "prints the answer inside a literal f-string"),
        ("n = 17 * 12\nprint(n)", "204", False, ""),
        ("eggs = 16 - 3 - 4\nprint(eggs * 2)", "18", False, ""),
        (
            "import sympy\nprint(sympy.factorint(2**64 + 1))",
            "{274177: 1, 67280421310721: 1}",
            False,
            "",
        ),
        ("for i in range(3):\n    print(i)", "2", False, ""),
        ("def f(\n", "1", False, "code does not parse"),
    ],
)
def test_cases(code: str, answer: str, leak: bool, reason: str) -> None:
    report = detect_leak(code, answer)
    assert report.leak == leak, report
    assert 0.0 <= report.score <= 1.0
    if reason:
        assert any(reason in r for r in report.reasons), report.reasons


def test_recall_and_false_positives_on_real_solutions() -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:300]]
    clean = [
        (c, r["answer"]) for r in rows if (c := gsm8k_solution_code(r["solution"], r["answer"]))
    ]
    assert len(clean) > 250
    false_pos = sum(detect_leak(c, a).leak for c, a in clean)
    caught = sum(detect_leak(m(c, a), a).leak for c, a in clean for m in MUTATIONS.values())
    assert false_pos / len(clean) <= 0.02
    assert caught / (len(clean) * len(MUTATIONS)) >= 0.95


def test_generated_solutions_are_real_python() -> None:
    row = json.loads(DATA.read_text().splitlines()[0])
    code = gsm8k_solution_code(row["solution"], row["answer"])
    assert code == "v1 = 16-3-4\nv2 = v1*2\nprint(round(v2, 6))"
