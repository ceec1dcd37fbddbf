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

from mathmill.grading.equivalence import grade
from mathmill.records import Verdict

__all__ = ["check_answer"]


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
