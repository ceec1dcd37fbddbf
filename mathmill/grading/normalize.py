"""String normalization and exact numbers for answers (the fast rules of the grader)."""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["closing_brace", "normalize", "parse_number"]

_REMOVE = [
    r"\\left",
    r"\\right",
    r"\\!",
    r"\\,",
    r"\\;",
    r"\\:",
    r"\\displaystyle",
    r"\\mathrm",
    r"\\\$",
    r"\$",
    r"^\s*\\text\{\s*",
    "\u00b0",
]
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_THOUSANDS_BRACE = re.compile(r"(\d)\{,\}(\d)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:, ?\d{3})+(?:\.\d+)?$")
_DECIMAL_COMMA = re.compile(r"^-?(?:0|\d{1,3}),(?:\d{1,2}|\d{4,})$|^-?0,\d+$")
_UNIT = re.compile(r"^(.*?\d)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_MIXED = re.compile(r"^(-?)(\d+)\s+(\d+)/(\d+)$")
_SPACED = re.compile(r"^-?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{?(-?\d+)\}?\{?(-?\d+)\}?$")
_SLASH = re.compile(r"^(-?\d+)\s*/\s*(\d+)$")
_DECIMAL = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?$", re.IGNORECASE)


def closing_brace(text: str, start: int) -> int | None:
    """The index just past the ``}`` closing a group opened right before ``start``
    (nested braces counted); None when it never closes.

    >>> closing_brace("f{a{b}c} d", 2)
    8
    >>> closing_brace("{open", 1) is None
    True
    """
    depth, i = 1, start
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def normalize(answer: str) -> tuple[str, bool]:
    """A canonical form for string comparison, and whether it was a percentage.

    >>> normalize(r"\\$10{,}000.")
    ('10000', False)
    >>> normalize(r"336^\\circ")
    ('336', False)
    >>> normalize(r"\\dfrac{1}{2}\\%")
    ('\\\\frac{1}{2}', True)
    """
    s = answer.strip()
    unit = _UNIT.match(s)
    if unit:  # "17\text{ cm}" -> "17"
        s = unit.group(1)
    s = _TEXT.sub(r"\1", s)
    s = _DEGREES.sub("", s)
    for pattern in _REMOVE:
        s = re.sub(pattern, "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    percent = bool(re.search(r"(\\%|%|\bpercent\b)\s*$", s))
    s = re.sub(r"(\\%|%|\bpercent\b)\s*$", "", s)
    s = _THOUSANDS_BRACE.sub(r"\1\2", s)
    s = s.strip().rstrip(".").strip()
    if _DECIMAL_COMMA.match(s):
        s = s.replace(",", ".")
    elif _THOUSANDS.match(s):
        s = s.replace(",", "").replace(" ", "")
    if _SPACED.match(s):
        s = s.replace(" ", "")
    s = re.sub(r"\s+", " ", s)
    return s, percent


def parse_number(s: str) -> Fraction | None:
    """An exact number from a normalized answer: integers (leading zeros allowed),
    decimals, ``a/b`` and ``\\frac{a}{b}``; None for anything else.

    >>> parse_number("016"), parse_number(r"\\frac{3}{4}"), parse_number("0.75")
    (Fraction(16, 1), Fraction(3, 4), Fraction(3, 4))
    """
    mixed = _MIXED.match(s.strip())
    if mixed:  # "1 1/2"
        sign, whole, num, den = mixed.groups()
        if int(den) == 0:
            return None
        value = int(whole) + Fraction(int(num), int(den))
        return -value if sign else value
    t = s.replace(" ", "")
    if _DECIMAL.match(t):
        try:
            return Fraction(t)
        except (ValueError, ZeroDivisionError):
            return None
    m = _FRAC.match(t) or _SLASH.match(t)
    if m is None:
        return None
    groups = m.groups()
    sign, num, den = ("", *groups) if len(groups) == 2 else groups
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if sign == "-" else value
