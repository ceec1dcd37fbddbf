"""Answer extraction and equivalence (math-verify + sympy), with the deciding rule.

>>> grade("336", r"336^\\circ").equivalent
True
"""

from mathmill.grading.choices import parse_options
from mathmill.grading.equivalence import GradeResult, GradeStatus, grade
from mathmill.grading.extract import ExtractedAnswer, extract_answer, last_boxed

__all__ = [
    "ExtractedAnswer",
    "GradeResult",
    "GradeStatus",
    "extract_answer",
    "grade",
    "last_boxed",
    "parse_options",
]
