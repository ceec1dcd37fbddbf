"""The grader on labelled pairs from four projects' test suites and our multiple-choice
pairs, extraction, option lists, and bad input."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mathmill.grading import extract_answer, grade, parse_options
from mathmill.grading.timeout import GradingTimeout, call_with_timeout

DATA = Path(__file__).parent / "data" / "grading"

# Rows where mathmill's grader deliberately disagrees with the source's label.
DISAGREE = {
    # hendrycks compares strings: a bare comma list is ordered there; we read it as a
    # set of answers (as Math-Verify and MARIO do), which is what "find all" asks.
    "math_equivalence_test.py::test_order": "unordered comma list",
    "math_equivalence_test.py::test_decimals": "unordered comma list",
    # MARIO accepts 3-4 significant digits for irrational values; we keep
    # math-verify's 6-digit rounding, so an early-rounded answer is not verified.
    "test_is_equiv.py::test_are_equal_under_sympy[1]": "1.414 for sqrt(2): too coarse",
    "test_is_equiv.py::test_is_equiv_real_or_list[8]": "1.732, 3.1416: too coarse",
    "test_is_equiv.py::test_is_equiv_real_or_list[9]": "125.663 for 40*pi: too coarse",
    "test_is_equiv.py::test_is_equiv_scinot[0]": "13-digit decimal for 1/432: not exact",
    "test_is_equiv.py::test_is_equiv_interval[1]": "2^(1/2^1000) is not 1",
    "test_is_equiv.py::test_is_equiv_matrix[4]": "systems with approximate values",
    "test_is_equiv.py::test_is_equiv_expression[0]": "exponent written as 0.5 vs 3/2 forms",
    # MARIO reads a bare 'i' as the imaginary unit; math-verify reads a variable.
    "test_is_equiv.py::test_is_equiv_complex[0]": "i as a variable",
    # MARIO says '' == '' but None != None; an absent answer never verifies for us.
    "test_is_equiv.py::test_is_equiv_units[0]": "empty answers never verify",
    # Differently written matrices/lists MARIO normalizes by hand.
    "test_is_equiv.py::test_is_equiv_matrix[2]": "doubly escaped LaTeX matrix",
    "test_is_equiv.py::test_is_equiv_matrix[3]": "[0.5, 1] is read as an interval",
    # Semantic equivalences beyond a grader's job.
    "test_is_equiv.py::test_is_equiv_trigonometric[1]": "trig identity with degrees",
    "test_is_equiv.py::test_is_equiv_function[1]": "f(x)=... vs y=...",
}


def rows() -> list[dict[str, Any]]:
    out = []
    for path in sorted(DATA.glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def options(row: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    opts, params = row.get("options") or {}, row.get("params") or {}
    if opts.get("match_types"):
        kw["match"] = tuple(opts["match_types"])
    if "precision" in params:
        kw["float_rounding"] = params["precision"]
    for name in ("strict", "allow_set_relation_comp"):
        if name in params:
            kw[name] = params[name]
    if row.get("problem"):
        kw["problem"] = row["problem"]
    return kw


ROWS = rows()
MC_ROWS = [r for r in ROWS if r["id"].startswith("multiple_choice::")]


def test_the_data_is_all_there() -> None:
    assert sum(r["repo"] != "mathmill" for r in ROWS) == 371
    assert sum(r["repo"] == "mathmill" for r in ROWS) == len(MC_ROWS) == 70
    assert set(DISAGREE) <= {r["id"] for r in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_labelled_pair(row: dict[str, Any]) -> None:
    result = grade(row["gold"], row["pred"], **options(row))
    if row["id"] in DISAGREE:
        assert result.equivalent != row["expected"], "no longer a disagreement: update DISAGREE"
    else:
        assert result.equivalent == row["expected"], (result.rule, result.reason)
    assert result.rule and result.status in ("equivalent", "different", "unparseable", "timeout")


def test_agreement_per_source_on_kept_rows() -> None:
    by_source: dict[str, list[bool]] = {}
    for row in ROWS:
        if row["id"] in DISAGREE:
            continue
        ok = grade(row["gold"], row["pred"], **options(row)).equivalent == row["expected"]
        by_source.setdefault(row["repo"], []).append(ok)
    for source, oks in by_source.items():
        assert sum(oks) / len(oks) >= 0.99, source


@pytest.mark.parametrize(
    ("gold", "pred", "expected", "rule", "problem"),
    [(r["gold"], r["pred"], r["expected"], r["rule"], r.get("problem")) for r in MC_ROWS],
    ids=[r["id"].split("::")[1] for r in MC_ROWS],
)
def test_multiple_choice(
    gold: str, pred: str, expected: bool, rule: str, problem: str | None
) -> None:
    """tests/data/grading/multiple_choice.jsonl: letters in prose and in other
    languages, option texts, option lists in the problem, and capitals that are no
    choice; the verdict and the rule that decided.
    """
    result = grade(gold, pred, problem=problem)
    assert (result.equivalent, result.rule) == (expected, rule), result.reason


def test_multiple_choice_with_explicit_options() -> None:
    options = {"A": "10", "B": "12", "C": "14"}
    assert grade("B", "12", options=options).rule == "choice_text"
    assert grade("12", "(B)", options=options).equivalent
    assert not grade("12", "C", options=options).equivalent
    assert not grade("B", "12", options={}).equivalent  # no options: no option text


@pytest.mark.parametrize(
    ("problem", "options"),
    [
        ("Which? (A) 10 (B) 12 (C) 14", {"A": "10", "B": "12", "C": "14"}),
        ("Which?\n(A) Line\n(B) Circle\n\nEnter the letter.", {"A": "Line", "B": "Circle"}),
        ("Pick one.\nA. 10\nB. 12\nD. 14\n", {"A": "10", "B": "12"}),
        ("Pick one.\nA) $x$\nB) $y$", {"A": "x", "B": "y"}),
        ("Solve it. A) 1 B) 2 C) 3 D) 4", {"A": "1", "B": "2", "C": "3", "D": "4"}),
        (
            r"$\textbf{(A) }10\qquad\textbf{(B) }12\qquad\textbf{(C) }14$",
            {"A": "10", "B": "12", "C": "14"},
        ),
        (r"$\textbf{(A)}\ 3x\qquad\textbf{(B)}\ x^2$", {"A": "3x", "B": "x^2"}),
        ("Point A lies on BC. Find AB.", {}),
        ("If P(A) = 1/2 and P(B) = 1/3, find P(A and B).", {}),
        ('[asy] label("$A$", A, S); label("$B$", B, N); [/asy] Find $AB$.', {}),
        ("Only one option (A) 10.", {}),
        ("", {}),
        (None, {}),
    ],
)
def test_parse_options(problem: str | None, options: dict[str, str]) -> None:
    assert parse_options(problem) == options


@pytest.mark.parametrize(
    ("gold", "pred", "equivalent", "rule"),
    [
        ("336", r"336^\circ", True, "exact"),
        ("10000", r"10{,}000", True, "exact"),
        ("5600", "5,600", True, "exact"),
        ("16", "016", True, "numeric"),
        (r"\frac{3}{4}", "0.75", True, "numeric"),
        ("50", r"50\%", True, "exact"),
        ("0.5", r"50\%", True, "percent"),
        ("18", r"\$18", True, "exact"),
        ("17", r"17\text{ cm}", True, "exact"),
        ("1.5", "1 1/2", True, "numeric"),
        ("7", "8", False, "numeric"),
        ("Yes", "yes", True, "text"),
        ("north", "south", False, "text"),
        (r"(1, 2)", r"(2, 1)", False, "math_verify"),
        (r"\{1, 2\}", r"\{2, 1\}", True, "math_verify"),
        (r"[0, 1)", r"[0, 1]", False, "math_verify"),
        (r"x^2 + 2x + 1", r"(x+1)^2", True, "math_verify"),
    ],
)
def test_rules(gold: str, pred: str, equivalent: bool, rule: str) -> None:
    result = grade(gold, pred)
    assert (result.equivalent, result.rule) == (equivalent, rule), result.reason


@pytest.mark.parametrize(
    "pred",
    [
        r"10^{10^{10}}",
        "2**2**100",
        r"10^{99999999}",
        "{" * 200 + "1" + "}" * 200,
        "x" * 300_000,
        r"\frac{",
        "",
        None,
    ],
    ids=[
        "tower",
        "pytower",
        "huge-exponent",
        "nested",
        "enormous",
        "broken-latex",
        "empty",
        "none",
    ],
)
def test_adversarial_input_ends_quickly_with_a_reason(pred: object) -> None:
    start = time.monotonic()
    result = grade("1", pred)
    assert time.monotonic() - start < 10
    assert not result.equivalent
    assert result.status in ("unparseable", "different", "timeout") and result.reason


def test_timeouts_work_in_threads_too() -> None:
    outcome: list[object] = []

    def worker() -> None:
        try:
            call_with_timeout(time.sleep, 30, seconds=0.5)
            outcome.append("finished")
        except GradingTimeout:
            outcome.append("timeout")

    thread = threading.Thread(target=worker)
    start = time.monotonic()
    thread.start()
    thread.join(20)
    assert outcome == ["timeout"] and time.monotonic() - start < 15
    with pytest.raises(GradingTimeout):
        call_with_timeout(time.sleep, 30, seconds=0.3)  # main thread: the interval timer
    assert grade("2", "2.0").equivalent  # and grading still works afterwards


@pytest.mark.parametrize(
    ("text", "answer", "how"),
    [
        (r"so $x = \boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}", "boxed"),
        (r"\boxed{1} then \fbox{2}", "2", "boxed"),
        ("<final_answer>\\boxed{7}</final_answer>", "7", "boxed"),
        ("<final_answer> 12 </final_answer>", "12", "tag"),
        ("The final answer is 3/4.", "3/4", "phrase"),
        ("Final answer: $42$", "42", "phrase"),
        ("I pick option (B) here.", "B", "choice"),
        ("Checking each option, only (C) works, so not A.", "C", "choice"),
        ("The answer is not A; it is (B).", "B", "choice"),
        ("(A) fails, (B) is wrong, so the answer is **D**.", "D", "choice"),
        ("Answer: (D)", "D", "choice"),
        ("答案是 D", "D", "choice"),
        ("正确答案为（C）", "C", "choice"),
        ("故选：C", "C", "choice"),
        ("la réponse est B", "B", "choice"),
        ("Die Antwort ist B.", "B", "choice"),
        ("Option B gives 7, so the final answer is 7.", "7", "phrase"),
        ("The answer is a prime, 7.", "a prime, 7", "phrase"),
        ("Let A be the set; it has 5 elements.", "5", "last_number"),
        ("we get 12 apples and then 15 pears", "15", "last_number"),
    ],
)
def test_extraction(text: str, answer: str, how: str) -> None:
    found = extract_answer(text)
    assert found is not None and (found.text, found.how) == (answer, how)


def test_extraction_without_an_answer() -> None:
    assert extract_answer("") is None and extract_answer(None) is None
    assert extract_answer("no numbers at all", number_fallback=True) is None
    assert extract_answer("there were 3 of them", number_fallback=False) is None


def test_cli_grades_a_pair_and_a_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    one = subprocess.run(
        [sys.executable, "-m", "mathmill", "grade", r"\frac{1}{2}", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0 and "equivalent (equivalent; rule: numeric)" in one.stdout
    other = subprocess.run(
        [sys.executable, "-m", "mathmill", "grade", "7", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 1 and other.stdout.startswith("not equivalent")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"id": "a", "gold": "16", "pred": "016"}\n'
        "not json\n"
        '{"id": "b", "gold": "1"}\n'
        "\n"
        '{"id": "c", "gold": "1", "pred": "10^{10^{10}}"}\n'
        '{"id": "d", "gold": "(1,2)", "pred": "(2,1)"}\n'
        '{"id": "e", "gold": "B", "pred": "12", "problem": "(A) 10 (B) 12 (C) 14"}\n'
        '{"id": "f", "gold": "12", "pred": "C", "options": {"A": "10", "B": "12", "C": "14"}}\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "mathmill", "grade", "--file", str(pairs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r.get("id"), r["equivalent"], r["rule"]) for r in rows] == [
        ("a", True, "numeric"),
        (None, False, "input"),
        ("b", False, "input"),
        ("c", False, "guard"),
        ("d", False, "math_verify"),
        ("e", True, "choice_text"),
        ("f", False, "choice_text"),
    ]
    assert rows[1]["reason"].startswith("line 2 is not JSON")
    missing = subprocess.run(
        [sys.executable, "-m", "mathmill", "grade", "--file", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().startswith("error: cannot read")
        and "Traceback" not in missing.stderr
    )
