"""Grading an answer against a problem's reference answer: the one function sample,
tir and the code-run check share, so a given answer gets the same verdict everywhere.

>>> check_answer("12", r"\\frac{24}{2}").status
'correct'
>>> check_answer(None, "12").status
'unvalidated'
>>> check_answer("12", None).status
'no_answer'
"""

from __future__ import annotations

from collections.abc import Sequence

from mathmill.grading.equivalence import grade
from mathmill.grading.extract import extract_answer
from mathmill.records import Verdict

__all__ = ["check_answer", "grade_solution", "grade_solutions"]

Graded = tuple[str, str | None, str]
"""A solution's grade: (status, the answer found, why: ``rule: reason``)."""


def check_answer(
    reference: str | None, answer: str | None, *, problem: str | None = None
) -> Verdict:
    """The verdict on ``answer`` against ``reference``: ``correct`` or ``incorrect``
    (with the grader rule that decided and why), ``no_answer`` when there is no answer,
    ``unvalidated`` when there is no reference. ``problem``: its text, where the
    options of a multiple-choice problem are read.
    """
    if answer is None:
        return Verdict(status="no_answer", expected=reference, reason="no final answer")
    if reference is None:
        return Verdict(status="unvalidated", predicted=answer, reason="no reference answer")
    graded = grade(reference, answer, problem=problem)
    return Verdict(
        status="correct" if graded.equivalent else "incorrect",
        expected=reference,
        predicted=answer,
        rule=graded.rule,
        reason=graded.reason,
    )


def grade_solution(reference: str | None, text: str, problem: str | None = None) -> Graded:
    """Find the final answer in a solution ``text`` and grade it against ``reference``
    (:func:`check_answer`): (status, the answer found, ``rule: reason``).

    >>> grade_solution("12", r"so the answer is \\boxed{\\frac{24}{2}}")[:2]
    ('correct', '\\\\frac{24}{2}')
    """
    found = extract_answer(text)
    verdict = check_answer(reference, found.text if found else None, problem=problem)
    reason = f"{verdict.rule}: {verdict.reason}".strip(": ") if verdict.rule else verdict.reason
    return verdict.status, verdict.predicted, reason


def grade_solutions(items: Sequence[tuple[str | None, str, str | None]]) -> list[Graded]:
    """:func:`grade_solution` over (reference, text, problem) triples: one batch of
    work for the helper process (:mod:`mathmill.sidecar`).
    """
    return [grade_solution(*item) for item in items]
