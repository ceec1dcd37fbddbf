"""Answer equivalence: fast exact and numeric rules, then math-verify (sympy).

The verdict says which rule decided and why. Enormous or adversarial input ends as
``unparseable`` or ``timeout`` with a reason, never a hang.

>>> grade("10{,}000", "10000").rule
'exact'
>>> grade(r"\\frac{1}{2}", "0.5").equivalent
True
>>> grade("{1, 2}", "{2, 1}").rule
'math_verify'
>>> grade("C", "Checking each option, only (C) works, so not A.").rule
'choice'
>>> grade("B", "12", problem="(A) 10 (B) 12 (C) 14").rule
'choice_text'
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from mathmill.grading.choices import as_choice, find_choice, parse_options
from mathmill.grading.extract import extract_answer
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
    problem: str | None = None,
    options: Mapping[str, str] | None = None,
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
    ``choice`` / ``choice_text`` (multiple choice, below); ``numeric`` (integers
    with leading zeros, decimals within ``rel_tol``, fractions, percentages read both
    as x and x/100); ``text`` (case-insensitive words); ``math_verify`` (sympy:
    expressions, sets vs tuples, intervals, matrices), which also extracts the answer
    from model text. ``match`` picks math-verify's extractors (``latex``, ``expr``);
    ``float_rounding``, ``strict`` and ``allow_set_relation_comp`` are passed to its
    ``verify``.

    Multiple choice: a gold letter (``C``, ``(C)``, ``\\text{(C)}``, ``(B) 12``) is
    compared with the letter of the prediction, found on its own or in prose ("only
    (C) works, so not A", "答案是 D"): rule ``choice``. The option texts, given as
    ``options`` or parsed from ``problem`` (:func:`parse_options`), make a letter
    and its option's text the same answer both ways: rule ``choice_text``. A gold
    that is not a letter is graded as a choice only when the options are known.
    """
    g, p = _text(gold).strip(), _text(pred).strip()
    if not g or not p:
        # An absent answer never verifies anything, not even another absent one.
        which = (
            "both answers are" if not g and not p else f"the {'gold' if not g else 'prediction'} is"
        )
        return GradeResult(False, "unparseable", "empty", f"{which} empty")
    for name, value in (("gold", g), ("prediction", p)):
        trouble = _guard(value)
        if trouble:
            return GradeResult(False, "unparseable", "guard", f"the {name} is {trouble}")
    mv_options = (
        ("float_rounding", float_rounding),
        ("strict", strict),
        ("allow_set_relation_comp", allow_set_relation_comp),
    )
    settings = _Settings(rel_tol, timeout_s, match, mv_options)
    gn, pn = normalize(g), normalize(p)
    if gn[0] == pn[0]:
        return GradeResult(True, "equivalent", "exact", "equal after normalization")
    if _CAPITAL.search(g) or _CAPITAL.search(p):  # else neither can name an option
        opts = dict(options) if options is not None else parse_options(problem)
        decided = _choice(g, p, opts, settings)
        if decided is not None:
            return decided
    return _rules(g, p, gn, pn, settings)


@dataclass(frozen=True)
class _Settings:
    rel_tol: float
    timeout_s: float
    match: tuple[str, ...]
    mv_options: tuple[tuple[str, Any], ...]


_CAPITAL = re.compile(r"[A-J]")


def _same(a: str, b: str, settings: _Settings) -> GradeResult:
    """``a`` vs ``b`` under the rules after ``choice`` (guarded, no choices)."""
    for value in (a, b):
        trouble = _guard(value)
        if trouble:
            return GradeResult(False, "unparseable", "guard", f"an option text is {trouble}")
    an, bn = normalize(a), normalize(b)
    if an[0] == bn[0]:
        return GradeResult(True, "equivalent", "exact", "equal after normalization")
    return _rules(a, b, an, bn, settings)


def _choice(g: str, p: str, opts: dict[str, str], settings: _Settings) -> GradeResult | None:
    """The multiple-choice verdict, or None when this is no multiple-choice pair."""
    gold = as_choice(g)
    pred = as_choice(p)
    p_letter = pred[0] if pred else None
    answer = p  # the prediction's answer when it names no letter
    if p_letter is None and (gold or opts):
        found = extract_answer(p, number_fallback=False)
        if found is not None and found.how != "choice":  # a boxed, tagged or stated answer
            answer = found.text
            inner = as_choice(answer)
            p_letter = inner[0] if inner else None
            if p_letter is None and found.how == "phrase":  # "the answer is not A; it is (B)"
                p_letter = find_choice(answer)
        else:  # a choice statement, or no answer found: the decisive letter mentioned
            p_letter = found.text if found is not None else find_choice(p)
    if gold is not None:
        g_letter, g_text = gold
        if p_letter is not None:
            same = g_letter == p_letter
            return GradeResult(
                same,
                "equivalent" if same else "different",
                "choice",
                f"both choose {g_letter}" if same else f"{g_letter} != {p_letter}",
            )
        target = opts.get(g_letter) or g_text
        if not target:
            return None
        verdict = _same(target, answer, settings)
        reason = f"option {g_letter} is {target!r}; {verdict.rule}: {verdict.reason}"
        if not verdict.equivalent:
            for letter, text in opts.items():
                if letter != g_letter and text and _same(text, answer, settings).equivalent:
                    reason = f"the prediction is option {letter}'s text, not option {g_letter}'s"
                    break
        return GradeResult(verdict.equivalent, verdict.status, "choice_text", reason)
    if p_letter is None:
        return None
    text = opts.get(p_letter) or (pred[1] if pred else "")
    if not text:
        if opts:
            return GradeResult(False, "different", "choice", f"there is no option {p_letter}")
        return None
    verdict = _same(g, text, settings)
    reason = f"option {p_letter} is {text!r}; {verdict.rule}: {verdict.reason}"
    return GradeResult(verdict.equivalent, verdict.status, "choice_text", reason)


def _rules(
    g: str, p: str, gn: tuple[str, bool], pn: tuple[str, bool], settings: _Settings
) -> GradeResult:
    """The rules after ``exact``: numeric, percent, text and math-verify."""
    (gn_s, g_pct), (pn_s, p_pct) = gn, pn
    rel_tol, timeout_s = settings.rel_tol, settings.timeout_s
    gv, pv = parse_number(gn_s), parse_number(pn_s)
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
    if _WORDS.match(gn_s) and _WORDS.match(pn_s):
        same = gn_s.casefold() == pn_s.casefold()
        return GradeResult(
            same,
            "equivalent" if same else "different",
            "text",
            "same words" if same else "different words",
        )
    try:
        equal, reason = call_with_timeout(
            _math_verify, g, p, settings.match, settings.mv_options, seconds=timeout_s
        )
    except GradingTimeout:
        return GradeResult(False, "timeout", "math_verify", f"no decision within {timeout_s:g}s")
    except Exception as e:  # sympy raises many kinds of errors on odd input
        return GradeResult(False, "unparseable", "math_verify", f"{type(e).__name__}: {e}"[:200])
    if equal is None:
        return GradeResult(False, "unparseable", "math_verify", reason)
    return GradeResult(equal, "equivalent" if equal else "different", "math_verify", reason)
