"""Multiple-choice answers: the options a problem lists, a letter written on its own,
and the decisive letter in a model's prose.

>>> parse_options("Which is prime? (A) 4 (B) 6 (C) 7")
{'A': '4', 'B': '6', 'C': '7'}
>>> as_choice("(B) 12")
('B', '12')
>>> find_choice("Checking each option, only (C) works, so not A.")
'C'
>>> find_choice("Let A be the set of even numbers.") is None
True
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from mathmill.grading.normalize import closing_brace

__all__ = ["LETTERS", "as_choice", "find_choice", "parse_options"]

LETTERS = "ABCDEFGHIJ"
"""The letters read as options when the problem does not list its own."""

_MAX_OPTION = 300  # longer "option text" means the markers were not an option list

# Markers of an option list, by style: "(A) 10", "\textbf{(A) }10", "A. 10" / "A) 10"
# at the start of a line, "A) 10 B) 12" inline.
_WRAPPED = r"\\(?:textbf|text|mathrm|mathbf|textrm|mbox|bf)\s*\{\s*\(\s*([A-J])\s*\)[^{}]*\}"
_STYLES = {
    "paren": re.compile(_WRAPPED + r"|(?<![\w\\])\(\s*([A-J])\s*\)"),
    "line": re.compile(
        r"^[ \t]*(?:[-*][ \t]+)?(?:\*\*)?([A-J])(?:\*\*)?[ \t]*[.):](?:\*\*)?[ \t]+", re.MULTILINE
    ),
    "inline": re.compile(r"(?<![\w(\\])([A-J])\)[ \t]"),
}
_EDGE = r"(?:\s|\$|\\qquad|\\quad|\\[ ,;:!>]|~|\\\\|\\hspace\*?\{[^{}]*\}|\\hfill)"
_LEAD = re.compile(rf"^{_EDGE}+")
_TRAIL = re.compile(rf"(?:{_EDGE}|[,;]|\b(?:and|or))+$")


def _clean(text: str) -> str:
    text = _TRAIL.sub("", _LEAD.sub("", text))
    if text.endswith(".") and not text.endswith(".."):
        text = _TRAIL.sub("", text[:-1])
    return text.strip()


def parse_options(problem: str | None) -> dict[str, str]:
    """The options a problem lists, letter -> option text; empty when it lists none.

    Option lists are the markers ``(A) (B) (C)`` (also ``\\textbf{(A) }`` as in AMC
    problems), ``A. / A) / A:`` at the start of lines, or ``A) B)`` inline, with
    consecutive letters from A (two at least). Figure labels and prose capitals
    ("point A", ``label("$A$", A)``) are not options.

    >>> parse_options(r"$\\textbf{(A) }10\\qquad\\textbf{(B) }12\\qquad\\textbf{(C) }14$")
    {'A': '10', 'B': '12', 'C': '14'}
    >>> parse_options("Pick one.\\nA. 10\\nB. 12\\n")
    {'A': '10', 'B': '12'}
    >>> parse_options("Point A lies on segment BC; find AB.")
    {}
    """
    if not problem or "A" not in problem:
        return {}
    return dict(_options(problem))


@functools.lru_cache(maxsize=1024)  # the same problem is graded once per sample
def _options(problem: str) -> tuple[tuple[str, str], ...]:
    best: list[tuple[str, int, int]] = []
    for pattern in _STYLES.values():
        marks = [
            (next(g for g in m.groups() if g), m.start(), m.end())
            for m in pattern.finditer(problem)
        ]
        for i, (letter, _, _) in enumerate(marks):
            if letter != "A":
                continue
            run = [marks[i]]
            for mark in marks[i + 1 :]:
                if mark[0] != chr(ord(run[-1][0]) + 1):
                    break
                run.append(mark)
            if len(run) > len(best):
                best = run
    if len(best) < 2:
        return ()
    out: list[tuple[str, str]] = []
    for k, (letter, _, end) in enumerate(best):
        if k + 1 < len(best):
            stop = best[k + 1][1]
        else:
            newline = problem.find("\n", end)
            stop = len(problem) if newline < 0 else newline
        raw = problem[end:stop]
        if len(raw) > _MAX_OPTION or "\n\n" in raw.strip():
            return ()
        out.append((letter, _clean(raw)))
    return tuple(out)


_WRAPPERS = re.compile(r"^\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf|mbox|bf)\s*\{")
_DELIMS = re.compile(r"^(?:\$\$|\$|\\\(|\\\[)(.*?)(?:\$\$|\$|\\\)|\\\])$", re.DOTALL)


def _unwrap(text: str) -> str:
    """Strip math delimiters, bold, a trailing period, and a ``\\boxed{}``/``\\text{}``
    around the whole answer, repeatedly.
    """
    prev = None
    s = unicodedata.normalize("NFKC", text)
    while s != prev:
        prev = s
        s = s.strip().rstrip(".").strip()
        s = _DELIMS.sub(r"\1", s)
        if s.startswith("**") and s.endswith("**") and len(s) > 4:
            s = s[2:-2]
        m = _WRAPPERS.match(s)
        if m and closing_brace(s, m.end()) == len(s):
            s = s[m.end() : -1]
    return s


_ALONE = re.compile(
    r"^(?:(?:option|choice|answer)\s*:?\s*)?\(?\s*([A-J])\s*\)?\s*[.):]?$", re.IGNORECASE
)
_WITH_TEXT = re.compile(
    r"^(?:\(\s*([A-J])\s*\)\s*|([A-J])\s*[.):]\s+)(.+)$|^" + _WRAPPED + r"\s*(.+)$", re.DOTALL
)


def as_choice(text: str | None, letters: str = LETTERS) -> tuple[str, str] | None:
    """(letter, option text) when ``text`` is a choice written on its own: ``C``,
    ``(C)``, ``D.``, ``D)``, ``**D**``, ``\\text{(C)}``, ``\\boxed{C}``,
    ``Answer: (D)``, or a letter with its option text (``(B) 12``, ``B. 12``,
    ``\\textbf{(B) }12``); the text is ``""`` without one. None otherwise.

    >>> as_choice(r"$\\boxed{\\text{(C)}}$."), as_choice("**D**"), as_choice("B. 12")
    (('C', ''), ('D', ''), ('B', '12'))
    >>> as_choice("A train leaves at noon") is None, as_choice("x") is None
    (True, True)
    """
    if not text or len(text) > 200:
        return None
    s = _unwrap(text)
    alone = _ALONE.match(s)
    if alone:
        letter = alone.group(1)
        if letter.isupper() or "(" in s:  # "answer: b" is not a choice; "(b)" is
            letter = letter.upper()
            return (letter, "") if letter in letters else None
        return None
    m = _WITH_TEXT.match(s)
    if m is None:
        return None
    letter = m.group(1) or m.group(2) or m.group(4)
    rest = _clean(_unwrap(m.group(3) or m.group(5) or ""))
    if letter not in letters or not rest or len(rest) > 80 or _STYLES["paren"].search(rest):
        return None  # "(A) and (B) are both true" is no single choice
    return letter, rest


# --- the decisive choice in prose --------------------------------------------------

_L = r"(?P<letter>[A-J])"
# Possessive quantifiers (*+, ++) throughout: no backtracking over runs of spaces.
_DECOR = r"[\s*$({\[]*+(?:\\(?:textbf|text|mathrm|mathbf|boxed|mbox)\s*+\{[\s(]*+)?"
_LEADS = [
    # English
    r"\b(?:(?:the|my|our)\s++)?(?:(?:final|correct|right|best|only|true)\s++)?"
    r"(?:answer|option|choice)(?:\s++(?:choice|option))?\s*+"
    r"(?:is|would\s++be|should\s++be|must\s++be|will\s++be|=|:|-|—)",
    r"\b(?:(?:I|we)\s++)?(?:choose|select|pick|go\s++with)\s++(?:(?:option|choice|answer)\s++)?",
    # French, German, Spanish, Italian, Portuguese, Russian
    r"\b(?:la\s++)?(?:bonne\s++)?r[ée]ponse(?:\s++(?:correcte|finale))?\s*+(?:est|:)",
    r"\b(?:die\s++)?(?:richtige\s++)?antwort\s*+(?:ist|lautet|:)",
    r"\b(?:la\s++)?respuesta(?:\s++(?:correcta|final))?\s*+(?:es|:)",
    r"\b(?:la\s++)?risposta(?:\s++(?:corretta|finale))?\s*+(?:è|e|:)",
    r"\b(?:a\s++)?resposta(?:\s++(?:correta|final))?\s*+(?:é|e|:)",
    r"(?:правильный\s++)?ответ\s*+(?::|—|-)",
    # Chinese, Japanese, Korean
    r"答案(?:\s*+(?:应该|应|就|即))?(?:\s*+(?:是|为|為|选|選|:))?",
    r"(?:(?:故|所以|因此|应该|应|则)\s*+)?选(?:择|項|项)?:?",
    r"(?:答え|正解)(?:\s*+(?:は|:))?",
    r"정답(?:\s*+(?:은|는|:))?",
]
_STATEMENT = re.compile(r"(?:" + "|".join(_LEADS) + r")" + _DECOR + _L, re.IGNORECASE)
_MENTION = re.compile(
    r"(?<![\w\\])\(\s*+(?P<p>[A-J])\s*+\)"
    r"|\b(?:option|choice|opci[óo]n|opzione|选项)\s*+\(?+\s*+(?P<o>[A-J])\b\)?",
    re.IGNORECASE,
)
_DECISIVE_AFTER = re.compile(
    r"[\s*$)\]}]*+(?:(?:is|must\s++be|has\s++to\s++be|would\s++be)\s++(?:the\s++)?"
    r"(?:correct|right|true|valid|answer|best|one)|works|holds|satisfies|fits|matches|is\s++it\b"
    r"|正确|對|对)",
    re.IGNORECASE,
)
_DECISIVE_BEFORE = re.compile(r"(?:\bonly|\bmust\s++be|\bhence|\bthus|\btherefore)\s*+$", re.I)
_BARE_DECISIVE = re.compile(
    r"(?<![\w\\$])"
    + _L
    + r"\s++is\s++(?:the\s++)?(?:correct|right)(?:\s++(?:answer|option|choice))?\b"
)
# A negation, then only a list of letters up to the mention: "not A", "rule out (A) and".
_NEG_BEFORE = re.compile(
    r"(?:\bnot|n't|\bnor|\bno|\bneither|rule[sd]?\s++out|eliminat\w*|exclud\w*|\bexcept"
    r"|rather\s++than|instead\s++of|\bnicht|\bkein\w*|\bpas|\bnon|\bni|不是|排除|而非|不选|不)"
    r"(?:[\s,&()*$]|\b(?:and|or|nor|option|choice|answer)\b|\b[A-J]\b)*+$",
    re.IGNORECASE,
)
_NEG_AFTER = re.compile(
    r"[\s*$)\]}]*+(?:(?:is|are|was|seems)\s++)?(?:not\b|n't|wrong|incorrect|false|fails?\b"
    r"|invalid|impossible|out\b|eliminated|excluded|ruled\s++out|doesn't|does\s++not|cannot"
    r"|can't|won't|不对|错误|错)",
    re.IGNORECASE,
)
# A bare letter followed by a lowercase word is an article, a pronoun or a name ("the
# answer is a prime", "Answer: I think", "we choose B to be"), unless the word links
# a reason ("the answer is B because").
_LINKS = {
    "because", "since", "as", "so", "thus", "hence", "therefore", "which", "and", "with",
    "given", "for", "here", "there", "then", "now", "car", "puisque", "donc", "weil", "da",
    "denn", "also", "porque", "pues", "perché", "poiché", "quindi", "is", "ist", "est",
}  # fmt: skip
_NEXT_WORD = re.compile(r"\s++([a-zà-ÿ]+)")
_OPERATOR = re.compile(r"[A-Za-z0-9_'’]|\s*+(?:[=+/^_<>≤≥∪∩×·∈⊂⊆|\\]|\*(?!\*)|-\S)")


@dataclass(frozen=True)
class _Hit:
    letter: str
    level: int  # 3 an answer statement, 2 a decisive one or "option X", 1 "(X)"
    start: int
    end: int


def _negated(text: str, start: int, end: int) -> bool:
    return bool(
        _NEG_BEFORE.search(text[max(0, start - 40) : start])
        or _NEG_AFTER.match(text[end : end + 40])
    )


def _hits(text: str, letters: str) -> list[_Hit]:
    hits: list[_Hit] = []
    for m in _STATEMENT.finditer(text):
        letter, start, end = m.group("letter"), m.start("letter"), m.end("letter")
        after = text[end : end + 40]
        bracketed = "(" in text[max(0, start - 3) : start] and after[:1] == ")"
        if not (letter.isupper() or bracketed):
            continue  # "the answer is a prime"; "(c)" is a choice
        letter = letter.upper()
        if letter not in letters or _OPERATOR.match(after):
            continue
        word = _NEXT_WORD.match(after)
        if not bracketed and word and word.group(1) not in _LINKS:
            continue  # "Answer: A train ...", "we choose B to be"
        hits.append(_Hit(letter, 3, start, end))
    for m in _MENTION.finditer(text):
        letter = (m.group("p") or m.group("o")).upper()
        if letter not in letters or not (m.group("p") or m.group("o")).isupper():
            continue
        decisive = _DECISIVE_AFTER.match(text[m.end() : m.end() + 60]) or _DECISIVE_BEFORE.search(
            text[max(0, m.start() - 20) : m.start()]
        )
        level = 2 if decisive or m.group("o") else 1
        hits.append(_Hit(letter, level, m.start(), m.end()))
    for m in _BARE_DECISIVE.finditer(text):
        if m.group("letter") in letters:
            hits.append(_Hit(m.group("letter"), 2, m.start("letter"), m.end("letter")))
    return hits


def find_choice(text: str | None, *, min_level: int = 1, letters: str = LETTERS) -> str | None:
    """The decisive option letter in a model's text, or None.

    An answer statement wins ("the answer is (C)", "Answer: **D**", "答案是 D",
    "正确答案为（C）", "la réponse est B", "die Antwort ist B"); then a decisive one
    ("only (C) works", "option C is correct"); then (``min_level=1``) any ``(C)``.
    Within a level the last mention counts; negated ones ("not A", "(D) fails",
    "rule out (B)") never do. A capital in prose ("Let A be", "point B", "A train")
    is no choice.

    >>> find_choice("(A) fails and (B) is too big, so the answer is (D).")
    'D'
    >>> find_choice("答案是 D"), find_choice("die Antwort ist B")
    ('D', 'B')
    >>> find_choice("A train leaves at noon; the answer is 3 hours.") is None
    True
    """
    if not text:
        return None
    s = unicodedata.normalize("NFKC", text)
    kept = [
        h for h in _hits(s, letters) if h.level >= min_level and not _negated(s, h.start, h.end)
    ]
    if not kept:
        return None
    top = max(h.level for h in kept)
    return max((h for h in kept if h.level == top), key=lambda h: h.start).letter
