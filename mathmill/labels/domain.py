"""A fast heuristic domain classifier: weighted keywords and a few hard rules over a
problem's text (and, optionally, its solution code and a plan or solution text) give
one of a configurable set of domains, by default algebra, number theory,
combinatorics and geometry.

>>> classify("How many ways can 5 people be seated around a round table?").domain
'combinatorics'
>>> label = classify("Find the remainder when $2^{100}$ is divided by 7.")
>>> label.domain, label.rule
('number theory', 'remainder-divided-by')
>>> MATH_SUBJECTS["precalculus"]
'algebra'

How a label is made:

1. The text is lower-cased, the drawing code of ``[asy]`` figures is set aside (a
   figure counts as ``[asy]``, not as the words of its code), and the text is split
   into tokens (words, and LaTeX commands such as ``\\binom``); plurals fold onto the
   keyword they inflect (``triangles`` counts as ``triangle`` unless the plural is a
   keyword of its own, like ``degrees``). At each token the longest keyword phrase
   that starts there matches (``geometric sequence`` is algebra, so its ``geometric``
   no longer counts for geometry), by a dict look-up per token, not a scan per keyword.
2. Regular expressions (:class:`Pattern`: ``[asy]``, ``f(x)``, ``^\\circ``, numbers
   written in a base), precompiled, each starting with a literal so that ``re``
   searches for the literal instead of trying the pattern at every position.
3. Each match adds its weight to its domain's score; a keyword counts at most
   :attr:`DomainRules.max_repeats` times. Code hits are scaled by
   :attr:`DomainRules.code_weight`, plan hits by :attr:`DomainRules.plan_weight`.
4. Hard rules (checked in order on the problem text only) override the scores: the
   first whose pattern matches decides, unless its ``unless`` domain scores higher
   than its own domain (the ``[asy]`` figure rule yields to problems whose probability
   words outweigh their geometry words).
5. Otherwise the highest score wins. Ties go to the domain listed first in
   :attr:`DomainRules.domains` (by default algebra, the most common domain and the
   catch-all, then number theory, combinatorics, geometry). No match at all gives the
   first domain with ``rule="default"`` and confidence 0.

Keywords match whole words, case-insensitively. About 25-35 microseconds per
MATH problem on one core, 30,000-40,000 problems/s (``bench/classify.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

__all__ = [
    "DEFAULT_DOMAINS",
    "DEFAULT_RULES",
    "MATH_SUBJECTS",
    "DomainLabel",
    "DomainRules",
    "HardRule",
    "Pattern",
    "classify",
    "classify_many",
    "math_subject_domain",
]

ALGEBRA, NUMBER_THEORY, COMBINATORICS, GEOMETRY = (
    "algebra",
    "number theory",
    "combinatorics",
    "geometry",
)
DEFAULT_DOMAINS: tuple[str, ...] = (ALGEBRA, NUMBER_THEORY, COMBINATORICS, GEOMETRY)
"""The default domains, in tie-break order."""

MATH_SUBJECTS: dict[str, str] = {
    "algebra": ALGEBRA,
    "intermediate_algebra": ALGEBRA,
    "prealgebra": ALGEBRA,
    # A choice: MATH's precalculus (trigonometry, vectors, matrices, complex numbers,
    # polar coordinates) is closest to algebra among the four domains.
    "precalculus": ALGEBRA,
    "number_theory": NUMBER_THEORY,
    "counting_and_probability": COMBINATORICS,
    "geometry": GEOMETRY,
}
"""MATH's subject labels (snake case) and the default domain each maps to.
``precalculus -> algebra`` is a choice, not a fact: its trigonometry could go to
geometry. :func:`math_subject_domain` also takes the display names
(``"Counting & Probability"``).
"""


def math_subject_domain(subject: str) -> str | None:
    """The default domain of a MATH subject, in snake case (``number_theory``) or as
    displayed (``"Intermediate Algebra"``, ``"Counting & Probability"``); None if
    unknown.

    >>> math_subject_domain("Counting & Probability")
    'combinatorics'
    """
    key = re.sub(r"[\s\-]+", "_", subject.strip().lower().replace("&", "and"))
    return MATH_SUBJECTS.get(key)


@dataclass(frozen=True)
class Pattern:
    """A weighted regular expression, searched in the lower-cased text (write it in
    lower case). Start it with a literal where you can (a lookbehind after the literal
    can check what comes before): Python's ``re`` then finds the literal first, far
    faster than trying the pattern at every position.
    """

    name: str
    regex: str
    weight: float


@dataclass(frozen=True)
class HardRule:
    """A rule that decides the domain outright when ``pattern`` matches the problem
    text (lower-cased: write patterns in lower case).

    Args:
        name: reported as :attr:`DomainLabel.rule`.
        domain: the domain it gives.
        pattern: a regular expression searched in the problem text.
        also: a second expression that must match too (anywhere), if given.
        unless: a domain whose keyword score, when higher than ``domain``'s, makes the
            rule stand aside.
        confidence: the confidence of a label this rule decides (at least; more when
            the keyword margin agrees and is larger).
    """

    name: str
    domain: str
    pattern: str
    also: str | None = None
    unless: str | None = None
    confidence: float = 0.9


def _w(**weights: float) -> dict[str, float]:
    return weights


# Keywords: a word, a phrase (words separated by spaces; hyphens and apostrophes split
# words as in the text) or a LaTeX command (``\binom``). Plurals in -s/-es/-ies match
# without being listed. Weights: 3 = nearly decisive, 2 = strong, 1 = typical,
# below 1 = a hint shared with other domains.
_ALGEBRA_WORDS: dict[str, float] = {
    "solve": 1.0,
    "solve for": 1.5,
    "equation": 1.5,
    "system of equations": 2.5,
    "linear": 1.5,
    "quadratic": 2.0,
    "polynomial": 2.5,
    "monic": 2.5,
    "coefficient": 1.5,
    "leading coefficient": 2.0,
    "degree": 1.0,
    "root": 1.5,
    "real roots": 2.0,
    "real solutions": 2.0,
    "zeros": 1.5,
    "square root": 0.5,
    "function": 1.5,
    "domain": 1.5,
    "range": 1.0,
    "inverse": 1.0,
    "inequality": 2.0,
    "sequence": 1.5,
    "arithmetic sequence": 2.5,
    "geometric sequence": 2.5,
    "geometric series": 2.5,
    "series": 1.5,
    "sum": 0.5,
    "infinite": 0.5,
    "\\sum": 1.0,
    "\\infty": 1.0,
    "logarithm": 2.0,
    "log": 1.5,
    "\\log": 2.0,
    "\\ln": 2.0,
    "exponent": 1.0,
    "exponential": 1.5,
    "expression": 1.0,
    "simplify": 1.5,
    "evaluate": 1.0,
    "expand": 1.5,
    "rationalize": 2.0,
    "denominator": 0.5,
    "variable": 1.0,
    "real number": 1.0,
    "complex": 1.5,
    "complex number": 2.5,
    "imaginary": 2.0,
    "maximum value": 1.5,
    "minimum value": 1.5,
    "slope": 2.0,
    "intercept": 2.0,
    "graph": 1.0,
    "parabola": 2.0,
    "ellipse": 2.0,
    "hyperbola": 2.0,
    "asymptote": 2.5,
    "foci": 1.5,
    "matrix": 2.5,
    "vector": 2.0,
    "\\mathbf": 1.0,
    "determinant": 2.5,
    "projection": 2.0,
    "\\det": 2.5,
    "\\sin": 1.5,
    "\\cos": 1.5,
    "\\tan": 1.5,
    "\\sec": 1.5,
    "\\csc": 1.5,
    "\\cot": 1.5,
    "\\arcsin": 2.0,
    "\\arccos": 2.0,
    "\\arctan": 2.0,
    "trigonometric": 1.5,
    "radians": 1.5,
    "polar coordinates": 2.5,
    "rectangular coordinates": 2.0,
    "spherical coordinates": 2.5,
    "cylindrical coordinates": 2.5,
    "percent": 1.0,
    "interest": 1.5,
    "average": 0.5,
    "mean": 0.5,
    "median": 0.5,
    "ratio": 0.5,
    "proportional": 1.0,
    "dollars": 0.5,
    "cents": 0.3,
    "cost": 0.5,
    "miles": 0.5,
    "hours": 0.5,
    "speed": 0.5,
    "rate": 0.5,
}

_NUMBER_THEORY_WORDS: dict[str, float] = {
    "divisible": 2.5,
    "divisibility": 2.5,
    "divisor": 2.5,
    "divides": 2.0,
    "remainder": 2.0,
    "quotient": 1.0,
    "modulo": 3.0,
    "mod": 2.5,
    "\\pmod": 3.0,
    "\\mod": 3.0,
    "\\equiv": 2.0,
    "congruence": 3.0,
    "congruent to": 1.5,
    "residue": 2.5,
    "prime": 2.0,
    "prime factor": 2.5,
    "prime factorization": 3.0,
    "composite": 2.0,
    "relatively prime": 3.0,
    # answer-format boilerplate ("m/n, where m and n are relatively prime positive
    # integers"), common in competition problems of every domain
    "relatively prime positive integers": 0.3,
    "coprime": 3.0,
    "gcd": 3.0,
    "\\gcd": 3.0,
    "greatest common divisor": 3.0,
    "greatest common factor": 3.0,
    "lcm": 3.0,
    "least common multiple": 3.0,
    "multiple": 1.0,
    "factor": 0.5,
    "factors": 1.0,
    "digit": 1.5,
    "units digit": 2.5,
    "ones digit": 2.5,
    "tens digit": 2.5,
    "sum of the digits": 2.0,
    "integer": 0.2,
    "integers": 0.2,
    "integer solutions": 2.0,
    "perfect square": 1.5,
    "perfect cube": 1.5,
    "base": 1.0,
    "repeating decimal": 2.0,
    "terminating decimal": 2.5,
    "palindrome": 1.0,
    "diophantine": 3.0,
    "totient": 3.0,
    "odd": 0.3,
    "even": 0.3,
}

_COMBINATORICS_WORDS: dict[str, float] = {
    "how many ways": 3.0,
    "number of ways": 3.0,
    "ways": 1.5,
    "arrange": 2.5,
    "arrangement": 2.5,
    "arranged": 2.5,
    "choose": 1.5,
    "chosen": 1.0,
    "select": 1.5,
    "selected": 1.0,
    "probability": 3.0,
    "at random": 2.0,
    "randomly": 2.0,
    "random": 1.5,
    "expected value": 2.5,
    "expected number": 2.5,
    "\\binom": 2.5,
    "\\dbinom": 2.5,
    "\\tbinom": 2.5,
    "binomial": 1.5,
    "permutation": 2.5,
    "combination": 2.0,
    "committee": 2.5,
    "dice": 2.5,
    "die": 2.0,
    "rolled": 2.0,
    "roll": 1.5,
    "coin": 1.0,
    "flip": 2.0,
    "flipped": 2.0,
    "toss": 2.0,
    "tossed": 2.0,
    "card": 1.5,
    "deck": 2.0,
    "spinner": 2.0,
    "outcome": 2.0,
    "odds": 1.5,
    "distinguishable": 3.0,
    "indistinguishable": 3.0,
    "distinct": 0.5,
    "path": 1.5,
    "lattice path": 3.0,
    "grid": 0.5,
    "pascal's triangle": 4.0,
    "pascal": 2.0,
    "counting": 1.5,
    "handshake": 2.0,
    "seated": 2.0,
    "seat": 1.5,
    "round table": 2.5,
    "marble": 1.5,
    "bag": 0.5,
    "subset": 2.0,
    "team": 0.5,
    "letters of the word": 3.0,
    "factorial": 0.5,
    "inclusion exclusion": 3.0,
    "pigeonhole": 3.0,
    "lottery": 2.0,
}

_GEOMETRY_WORDS: dict[str, float] = {
    "triangle": 2.0,
    "\\triangle": 2.5,
    "right triangle": 3.0,
    "isosceles": 2.5,
    "equilateral": 2.5,
    "hypotenuse": 2.5,
    "circle": 2.0,
    "radius": 2.0,
    "radii": 2.0,
    "diameter": 2.0,
    "circumference": 2.0,
    "chord": 2.0,
    "arc": 1.5,
    "sector": 1.5,
    "tangent": 1.0,
    "tangent to": 2.0,
    "angle": 1.5,
    "\\angle": 2.5,
    "degrees": 1.0,
    "area": 1.5,
    "surface area": 2.5,
    "perimeter": 2.0,
    "polygon": 2.0,
    "pentagon": 2.0,
    "hexagon": 2.0,
    "octagon": 2.0,
    "quadrilateral": 2.5,
    "rectangle": 1.5,
    "square": 0.5,
    "square units": 2.0,
    "square inches": 2.0,
    "square feet": 2.0,
    "square centimeters": 2.0,
    "square meters": 2.0,
    "parallelogram": 2.5,
    "trapezoid": 2.5,
    "rhombus": 2.5,
    "perpendicular": 2.0,
    "parallel": 1.5,
    "bisector": 2.0,
    "bisects": 2.0,
    "altitude": 2.0,
    "centroid": 2.5,
    "circumcenter": 3.0,
    "circumcircle": 3.0,
    "incircle": 3.0,
    "inscribed": 2.0,
    "circumscribed": 2.0,
    "congruent": 1.0,
    "similar": 0.7,
    "segment": 1.5,
    "line segment": 2.0,
    "midpoint": 1.0,
    "vertex": 0.7,
    "vertices": 1.5,
    "diagonal": 1.5,
    "side length": 2.0,
    "side": 0.7,
    "sides": 0.7,
    "length": 0.5,
    "volume": 1.5,
    "cube": 1.0,
    "sphere": 2.0,
    "cylinder": 2.0,
    "cone": 2.0,
    "prism": 2.0,
    "pyramid": 2.0,
    "tetrahedron": 2.5,
    "face": 1.0,
    "shaded region": 2.5,
    "region": 0.5,
    "figure": 1.0,
    "regular": 0.7,
    "\\pi": 0.5,
}

# Regular expressions over the lower-cased text, each starting with a literal.
_PATTERNS: dict[str, tuple[Pattern, ...]] = {
    ALGEBRA: (
        Pattern("f(x)=", r"\((?<=\b[a-z]\()\s*[a-z0-9]\s*\)\s*=", 1.5),  # also p(2) = ...
        Pattern("f(x)", r"\((?<=\b[fgh]\()\s*[a-z]\s*\)", 1.0),
        Pattern("^{-1}", r"\^\s*\{\s*-1\s*\}", 1.0),
        Pattern("matrix", r"\\begin\{[pbv]matrix\}", 2.5),
        Pattern("x^n", r"\^(?<=[a-z]\^)\s*\{?\s*[2-9]", 0.5),  # x^2, y^3
    ),
    NUMBER_THEORY: (
        Pattern("n_base", r"_(?<=\d_)\{?\s*(?:\d+|ten|two|eight|sixteen)\b", 2.5),  # 123_4
        Pattern("base n", r"base[- ]\$?\s*\d+", 2.5),
        Pattern("floor", r"\\l(?:floor|ceil)", 0.5),
        Pattern("repeating decimal", r"\.\\overline\{", 1.0),  # 0.\overline{3}
    ),
    COMBINATORICS: (Pattern("n!", r"!(?<=\d!)", 0.5),),
    GEOMETRY: (
        Pattern("[asy]", r"\[asy\]", 2.0),
        Pattern("^\\circ", r"\^\s*\{?\s*\\circ", 1.5),  # 60^\circ
        Pattern("\\overline{AB}", r"\\overline\{[a-z]{2}\}", 1.0),
    ),
}

# Code: identifiers (``math.comb`` is two tokens, ``math`` and ``comb``).
_CODE_WORDS: dict[str, dict[str, float]] = {
    ALGEBRA: _w(
        solve=2.0,
        solveset=2.0,
        nsolve=2.0,
        linsolve=2.0,
        roots=1.5,
        nroots=2.0,
        poly=1.5,
        expand=1.0,
        simplify=1.0,
        symbols=0.5,
        matrix=1.5,
        det=1.5,
        log=0.5,
    ),
    NUMBER_THEORY: _w(
        isprime=3.0,
        primerange=3.0,
        nextprime=3.0,
        primefactors=3.0,
        factorint=3.0,
        divisors=3.0,
        totient=3.0,
        mod_inverse=3.0,
        gcd=2.0,
        lcm=2.0,
        mod=1.5,
        digits=1.5,
    ),
    COMBINATORICS: _w(
        comb=3.0,
        perm=3.0,
        permutations=3.0,
        combinations=3.0,
        combinations_with_replacement=3.0,
        product=0.5,
        factorial=1.5,
        binomial=3.0,
        random=1.5,
        fraction=0.3,
    ),
    GEOMETRY: _w(
        pi=1.5,
        atan2=2.0,
        hypot=2.0,
        radians=1.0,
        degrees=1.0,
        area=1.5,
        triangle=2.0,
        circle=2.0,
        polygon=2.0,
        point=1.0,
        distance=1.0,
        radius=2.0,
    ),
}

_CODE_PATTERNS: dict[str, tuple[Pattern, ...]] = {
    NUMBER_THEORY: (
        Pattern("% n", r"%\s*(?:\d+|mod\b|m\b|n\b|p\b)", 1.0),  # x % 7, x % mod
        Pattern("pow(a, b, m)", r"pow\([^()]*,[^()]*,", 2.0),
    ),
}

_HARD_RULES: tuple[HardRule, ...] = (
    HardRule(
        "asy-figure",
        GEOMETRY,
        r"\[asy\]",
        also=r"triangle|circle|angle|polygon|quadrilateral|square|rectangle|hexagon|pentagon"
        r"|radius|area|perimeter|segment",
        unless=COMBINATORICS,
    ),
    HardRule("probability", COMBINATORICS, r"probability|expected value"),
    HardRule(
        "polynomial-division",
        ALGEBRA,
        # divided by an expression in a variable: "the remainder when p(x) is divided by x-1"
        r"(?:remainder|quotient)\b[^.?]{0,120}?\bdivided by\s*\$?\s*\(?[a-z]\b",
    ),
    HardRule(
        "remainder-divided-by",
        NUMBER_THEORY,
        # a number divided by a number: "the remainder when 2^{100} is divided by 7";
        # not "the remainder when $N$ is divided by 1000" (an answer format in AIME)
        r"remainder\b(?!\s+when\s+\$?[a-z]\$?\s+is\s+divided)[^.?]{0,120}?\bdivided by"
        r"\s*\$?\s*\{?\d",
    ),
    HardRule("modular", NUMBER_THEORY, r"\\(?:pmod|mod)\b|modulo\s*\$?\s*\d"),
    HardRule("counting-ways", COMBINATORICS, r"(?:how many|number of) (?:different )?ways\b"),
)

_ASY = re.compile(r"\[asy\].*?(?:\[/asy\]|$)", re.DOTALL)
_TOKEN = re.compile(r"\\?[a-z]+")
_CODE_TOKEN = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class DomainRules:
    """The classifier's configuration: domains, keyword weights and hard rules.

    Args:
        domains: the domains a label may take, in tie-break order.
        words: per domain, keywords (words, phrases, LaTeX commands) and their weights.
        patterns: per domain, regular expressions (:class:`Pattern`) over the text.
        code_words: per domain, identifiers in solution code and their weights.
        code_patterns: per domain, regular expressions over the code.
        hard_rules: checked in order; the first that applies decides.
        code_weight: scale of code hits against problem-text hits.
        plan_weight: scale of plan (or solution text) hits.
        max_repeats: how many times one keyword counts in one text.
        evidence: how many matched keywords a label keeps.

    Entries for domains outside ``domains`` are ignored, so
    ``DomainRules(domains=("algebra", "geometry"))`` is the default vocabulary cut
    down to two domains.

    >>> rules = DomainRules(domains=("calculus", "algebra"),
    ...                     words={"calculus": {"derivative": 2.0, "integral": 2.0}})
    >>> classify("Find the derivative of x^3.", rules=rules).domain
    'calculus'
    """

    domains: tuple[str, ...] = DEFAULT_DOMAINS
    words: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: {
            ALGEBRA: _ALGEBRA_WORDS,
            NUMBER_THEORY: _NUMBER_THEORY_WORDS,
            COMBINATORICS: _COMBINATORICS_WORDS,
            GEOMETRY: _GEOMETRY_WORDS,
        }
    )
    patterns: Mapping[str, Sequence[Pattern]] = field(default_factory=lambda: _PATTERNS)
    code_words: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: _CODE_WORDS)
    code_patterns: Mapping[str, Sequence[Pattern]] = field(default_factory=lambda: _CODE_PATTERNS)
    hard_rules: Sequence[HardRule] = _HARD_RULES
    code_weight: float = 1.0
    plan_weight: float = 0.5
    max_repeats: int = 3
    evidence: int = 8

    def __post_init__(self) -> None:
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct and not empty: {self.domains!r}")

    def restrict(self, domains: Iterable[str]) -> DomainRules:
        """These rules over ``domains`` only (each must have keywords here)."""
        chosen = tuple(domains)
        known = set(self.words) | set(self.patterns)
        missing = [d for d in chosen if d not in known]
        if missing:
            raise ValueError(
                f"no keywords for domain(s) {', '.join(map(repr, missing))}; "
                f"known: {', '.join(sorted(known))}"
            )
        return DomainRules(
            domains=chosen,
            words=self.words,
            patterns=self.patterns,
            code_words=self.code_words,
            code_patterns=self.code_patterns,
            hard_rules=self.hard_rules,
            code_weight=self.code_weight,
            plan_weight=self.plan_weight,
            max_repeats=self.max_repeats,
            evidence=self.evidence,
        )

    @cached_property
    def _compiled(self) -> _Compiled:
        return _Compiled(self)


# A hit: (domain index, weight, label).
_Hit = tuple[int, float, str]


class _Matcher:
    """Keywords as a dict from first token to candidate phrases (longest first), plus
    one combined regular expression; finds hits in one text.
    """

    def __init__(
        self,
        domains: tuple[str, ...],
        words: Mapping[str, Mapping[str, float]],
        patterns: Mapping[str, Sequence[Pattern]],
        token: re.Pattern[str],
    ) -> None:
        self.token = token
        index: dict[str, list[tuple[tuple[str, ...], list[_Hit]]]] = {}
        by_phrase: dict[tuple[str, ...], list[_Hit]] = {}
        for d, domain in enumerate(domains):
            for keyword, weight in words.get(domain, {}).items():
                phrase = tuple(token.findall(keyword.lower()))
                if phrase and weight:
                    by_phrase.setdefault(phrase, []).append((d, weight, keyword))
        for phrase, hits in by_phrase.items():
            index.setdefault(phrase[0], []).append((phrase, hits))
        for cands in index.values():
            cands.sort(key=lambda c: -len(c[0]))
        self.index = index
        vocab = {t for p in by_phrase for t in p}
        alias: dict[str, str] = {}
        for t in vocab:
            forms = [t + "s", t + "es"]
            if t.endswith("y"):
                forms.append(t[:-1] + "ies")
            for form in forms:
                if form not in vocab:
                    alias.setdefault(form, t)
        self.alias = alias
        self.regexes: list[tuple[re.Pattern[str], _Hit]] = [
            (re.compile(p.regex), (d, p.weight, p.name))
            for d, domain in enumerate(domains)
            for p in patterns.get(domain, ())
            if p.weight
        ]

    def hits(self, lower: str, max_repeats: int) -> list[_Hit]:
        """Every keyword and pattern hit in the lower-cased text ``lower``; a pattern
        counts at most ``max_repeats`` times.
        """
        alias, index = self.alias, self.index
        toks = [alias.get(t, t) for t in self.token.findall(lower)]
        out: list[_Hit] = []
        free = 0  # the first token not yet part of a matched phrase
        for i in [i for i, t in enumerate(toks) if t in index]:
            if i < free:
                continue
            for phrase, hits in index[toks[i]]:
                k = len(phrase)
                if k == 1 or tuple(toks[i : i + k]) == phrase:
                    out.extend(hits)
                    free = i + k
                    break
        for regex, hit in self.regexes:
            found = regex.findall(lower)
            if found:
                out.extend([hit] * min(len(found), max_repeats))
        return out


class _Compiled:
    """What :class:`DomainRules` compiles to, once per rules object."""

    def __init__(self, rules: DomainRules) -> None:
        self.domains = rules.domains
        self.text = _Matcher(rules.domains, rules.words, rules.patterns, _TOKEN)
        self.code = _Matcher(rules.domains, rules.code_words, rules.code_patterns, _CODE_TOKEN)
        where = {d: i for i, d in enumerate(rules.domains)}
        self.hard: list[tuple[HardRule, int, int | None, re.Pattern[str], re.Pattern[str] | None]]
        self.hard = []
        for rule in rules.hard_rules:
            if rule.domain not in where:
                continue
            also = re.compile(rule.also) if rule.also else None
            unless = where.get(rule.unless) if rule.unless else None
            pattern = re.compile(rule.pattern)
            self.hard.append((rule, where[rule.domain], unless, pattern, also))


@dataclass(frozen=True)
class DomainLabel:
    """A domain label and why.

    Attributes:
        domain: the label.
        scores: each domain's keyword score.
        confidence: in [0, 1]; for keywords the margin ``(best - second) / (best + 1)``
            (the +1 keeps one weak keyword from looking certain); for a hard rule the
            larger of its ``confidence`` and that margin when the keywords agree; 0 when
            nothing matched.
        rule: the hard rule that decided, ``"keywords"``, or ``"default"`` (no keyword
            matched: the first domain).
        evidence: the first matched keywords, as ``"domain:keyword"`` (``code:`` and
            ``plan:`` prefixes for hits in the code and the plan).
    """

    domain: str
    scores: dict[str, float]
    confidence: float
    rule: str
    evidence: list[str]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "domain": self.domain,
            "confidence": round(self.confidence, 4),
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "rule": self.rule,
            "evidence": list(self.evidence),
        }


DEFAULT_RULES = DomainRules()
"""The default rules (four domains)."""


def _add(
    hits: list[_Hit],
    scale: float,
    scores: list[float],
    evidence: list[str],
    domains: tuple[str, ...],
    prefix: str,
    max_repeats: int,
    keep: int,
) -> None:
    seen: dict[tuple[int, str], int] = {}
    for d, weight, label in hits:
        key = (d, label)
        count = seen.get(key, 0)
        if count >= max_repeats:
            continue
        seen[key] = count + 1
        scores[d] += weight * scale
        if count == 0 and len(evidence) < keep:
            evidence.append(f"{prefix}{domains[d]}:{label}")


def classify(
    problem: str,
    code: str | None = None,
    plan: str | None = None,
    rules: DomainRules | None = None,
) -> DomainLabel:
    """The domain of ``problem``, from its text and, if given, its solution ``code`` and
    a ``plan`` (or solution text). See the module's docstring for how.
    """
    rules = rules or DEFAULT_RULES
    compiled = rules._compiled
    domains = compiled.domains
    scores = [0.0] * len(domains)
    evidence: list[str] = []
    keep, repeats = rules.evidence, rules.max_repeats
    lower = problem.lower()
    if "[asy]" in lower:  # drawing code: its words are not the problem's
        lower = _ASY.sub("[asy]", lower)
    hits = compiled.text.hits(lower, repeats)
    _add(hits, 1.0, scores, evidence, domains, "", repeats, keep)
    if plan:
        hits = compiled.text.hits(plan.lower(), repeats)
        _add(hits, rules.plan_weight, scores, evidence, domains, "plan:", repeats, keep)
    if code:
        hits = compiled.code.hits(code.lower(), repeats)
        _add(hits, rules.code_weight, scores, evidence, domains, "code:", repeats, keep)
    # max() keeps the first of equal scores: ties go to the earlier domain
    best = max(range(len(domains)), key=scores.__getitem__)
    ordered = sorted(scores, reverse=True)
    top = ordered[0]
    second = ordered[1] if len(ordered) > 1 else 0.0
    margin = (top - second) / (top + 1.0) if top > 0 else 0.0
    by_name = dict(zip(domains, scores, strict=True))
    for rule, d, unless, pattern, also in compiled.hard:
        if pattern.search(lower) is None or (also is not None and not also.search(lower)):
            continue
        if unless is not None and scores[unless] > scores[d]:
            continue
        confidence = max(rule.confidence, margin if d == best else 0.0)
        return DomainLabel(domains[d], by_name, min(confidence, 1.0), rule.name, evidence)
    if top <= 0:
        return DomainLabel(domains[0], by_name, 0.0, "default", evidence)
    return DomainLabel(domains[best], by_name, margin, "keywords", evidence)


def classify_many(
    problems: Iterable[str],
    codes: Iterable[str | None] | None = None,
    plans: Iterable[str | None] | None = None,
    rules: DomainRules | None = None,
) -> list[DomainLabel]:
    """:func:`classify` over a list; ``codes`` and ``plans``, when given, pair up with
    ``problems`` by position (same length).
    """
    texts = list(problems)
    code_list = list(codes) if codes is not None else [None] * len(texts)
    plan_list = list(plans) if plans is not None else [None] * len(texts)
    if not len(texts) == len(code_list) == len(plan_list):
        raise ValueError("problems, codes and plans must have the same length")
    rules = rules or DEFAULT_RULES
    return [classify(p, c, s, rules) for p, c, s in zip(texts, code_list, plan_list, strict=True)]
