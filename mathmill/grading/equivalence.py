"""Answer equivalence: fast exact and numeric rules, then math-verify (sympy).

The verdict says which rule decided and why. Enormous or adversarial input ends as
``unparseable`` or ``timeout`` with a reason, never a hang.

>>> grade("10{,}000", "10000").rule
'exact'
>>> grade(r"\\frac{1}{2}", "0.5").equivalent
True
>>> grade("{1, 2}", "{2, 1}").rule
'math_verify'
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from mathmill.grading.normalize import normalize, parse_number
from mathmill.grading.timeout import GradingTimeout, call_with_timeout

__all__ = ["GradeResult", "GradeStatus", "grade"]

GradeStatus = Literal["equivalent", "different", "unparseable", "timeout"]

MAX_CHARS = 200_000
MAX_DEPTH = 50
MAX_EXPONENT = 10_000
_WORDS = re.compile(r"^[A-Za-z][A-Za-z '\-]*$")
_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*\(?\s*(\d+)")
_TOWER = re.compile(r"(?:\^|\*\*)\s*\{[^{}]*(?:\^|\*\*)|(?:\^|\*\*)\s*\d+\s*(?:\^|\*\*)")


@dataclass(frozen=True)
class GradeResult:
    """Whether two answers are equivalent, which rule decided, and why."""

    equivalent: bool
    status: GradeStatus
    rule: str
    reason: str = ""


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def _depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth -= 1
    return best


def _guard(s: str) -> str | None:
    if len(s) > MAX_CHARS:
        return f"longer than {MAX_CHARS} characters"
    if _depth(s) > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH}"
    if _TOWER.search(s):
        return "a tower of exponents"
    if any(int(e) > MAX_EXPONENT for e in _EXPONENT.findall(s)):
        return f"an exponent above {MAX_EXPONENT}"
    return None


def _close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)


_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed")


_PY_POW_GROUP = re.compile(r"\*\*\s*\(([^()]*)\)")
_PY_POW = re.compile(r"\*\*\s*(-?[\w.]+)")


def _latex(s: str) -> str:
    if _DELIMITED.search(s):
        return s
    if "**" in s and "\\" not in s:  # Python/sympy syntax, as code prints it
        s = _PY_POW.sub(r"^{\1}", _PY_POW_GROUP.sub(r"^{(\1)}", s))
    return f"${s}$"


@functools.lru_cache(maxsize=4096)
def _parsed(text: str, match: tuple[str, ...]) -> tuple[Any, ...]:
    from math_verify import parse
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    config: list[Any] = []
    if "latex" in match:
        config.append(LatexExtractionConfig())
    if "expr" in match:
        config.append(ExprExtractionConfig())
    return tuple(parse(_latex(text), config, parsing_timeout=None))


def _math_verify(
    gold: str, pred: str, match: tuple[str, ...], options: tuple[tuple[str, Any], ...]
) -> tuple[bool | None, str]:
    """(equal?, reason) with math-verify's own timeouts off (ours is outside)."""
    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled"
    g, p = _parsed(gold, match), _parsed(pred, match)
    if not g or not p:
        which = "gold" if not g else "prediction"
        return None, f"math-verify could not parse the {which}"
    equal = verify(list(g), list(p), timeout_seconds=None, **dict(options))
    return bool(equal), f"math-verify compared {g[0]} and {p[0]}"


def grade(
    gold: Any,
    pred: Any,
    *,
    rel_tol: float = 1e-6,
    timeout_s: float = 5.0,
    match: tuple[str, ...] = ("latex", "expr"),
    float_rounding: int = 6,
    strict: bool = True,
    allow_set_relation_comp: bool = False,
) -> GradeResult:
    """Decide whether ``pred`` is equivalent to ``gold``.

    Rules, first decisive one wins: ``empty``; ``exact`` (after normalizing LaTeX
    wrappers, ``\\$``, degree signs, thousands separators, trailing periods);
    ``numeric`` (integers with leading zeros, decimals within ``rel_tol``, fractions,
    percentages read both as x and x/100); ``text`` (case-insensitive words);
    ``math_verify`` (sympy: expressions, sets vs tuples, intervals, matrices), which
    also extracts the answer from model text. ``match`` picks math-verify's
    extractors (``latex``, ``expr``); ``float_rounding``, ``strict`` and
    ``allow_set_relation_comp`` are passed to its ``verify``.
    """
    g, p = _text(gold).strip(), _text(pred).strip()
    if not g or not p:
        # An absent answer never verifies anything, not even another absent one.
        which = (
            "both answers are" if not g and not p else f"the {'gold' if not g else 'prediction'} is"
        )
        return GradeResult(False, "unparseable", "empty", f"{which} empty")
    for name, value in (("gold", g), ("prediction", p)):
        problem = _guard(value)
        if problem:
            return GradeResult(False, "unparseable", "guard", f"the {name} is {problem}")
    gn, g_pct = normalize(g)
    pn, p_pct = normalize(p)
    if gn == pn:
        return GradeResult(True, "equivalent", "exact", "equal after normalization")
    gv, pv = parse_number(gn), parse_number(pn)
    if gv is not None and pv is not None:
        golds = [gv] + ([gv / 100] if g_pct else [])
        preds = [pv] + ([pv / 100] if p_pct else [])
        if g_pct != p_pct:
            golds += [gv / 100] if p_pct and not g_pct else []
            preds += [pv / 100] if g_pct and not p_pct else []
        for a in golds:
            for b in preds:
                if _close(a, b, rel_tol):
                    rule = "percent" if (a != gv or b != pv) else "numeric"
                    return GradeResult(True, "equivalent", rule, f"{a} == {b}")
        return GradeResult(False, "different", "numeric", f"{gv} != {pv}")
    if _WORDS.match(gn) and _WORDS.match(pn):
        same = gn.casefold() == pn.casefold()
        return GradeResult(
            same,
            "equivalent" if same else "different",
            "text",
            "same words" if same else "different words",
        )
    try:
        options = (
            ("float_rounding", float_rounding),
            ("strict", strict),
            ("allow_set_relation_comp", allow_set_relation_comp),
        )
        equal, reason = call_with_timeout(_math_verify, g, p, match, options, seconds=timeout_s)
    except GradingTimeout:
        return GradeResult(False, "timeout", "math_verify", f"no decision within {timeout_s:g}s")
    except Exception as e:  # sympy raises many kinds of errors on odd input
        return GradeResult(False, "unparseable", "math_verify", f"{type(e).__name__}: {e}"[:200])
    if equal is None:
        return GradeResult(False, "unparseable", "math_verify", reason)
    return GradeResult(equal, "equivalent" if equal else "different", "math_verify", reason)
