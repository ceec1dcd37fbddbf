"""Normalization of problem statements and answers, and the keys duplicates are found by.

Three levels, each built on the one before:

* :func:`normalize_statement`: the text a curated row keeps. Its meaning is unchanged;
  LaTeX spacing and a few spellings that typeset the same are made canonical, so two
  copies of one problem that differ only in those normalize equal.
* :func:`match_key`: lower-cased tokens of the normalized statement (no punctuation, no
  brackets, no ``$``), for exact-duplicate hashing and for n-grams.
* :func:`content_hash`: a hex digest of the match key; exact duplicates share it.

>>> normalize_statement(r"Find $ x $ if $\\left( x + 1 \\right)^{2} = \\dfrac{1}{4}$ .")
'Find $x$ if $(x+1)^2=\\\\frac{1}{4}$.'
>>> match_key(r"Find $x$ if $(x+1)^2=\\frac{1}{4}$.")
'find x if x + 1 ^ 2 = \\\\frac 1 4'
>>> normalize_answer(r"\\dfrac12"), normalize_answer("0.5"), normalize_answer("1,000.0")
('1/2', '1/2', '1000')
"""

from __future__ import annotations

import re
import unicodedata

import xxhash

from mathmill.grading.normalize import closing_brace, normalize, parse_number

__all__ = ["content_hash", "key_hash", "match_key", "normalize_answer", "normalize_statement"]

# Characters NFKC leaves alone that have a plain spelling with the same meaning.
_PLAIN = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2212": "-",
        "\u2044": "/",
        "\u00a0": " ",
    }
)
_ASY = re.compile(r"\[asy\].*?\[/asy\]", re.DOTALL | re.IGNORECASE)

# LaTeX commands rewritten everywhere. ``\\`` (a line break) is matched first so that
# its second backslash never starts a command.
_COMMANDS = re.compile(
    r"(?P<esc>\\\\)"
    r"|\\(?P<frac>[dt]frac|[dt]binom)(?![a-zA-Z])"
    r"|\\(?P<delim>left|right|middle|[bB]igg?[lrm]?)(?![a-zA-Z])\s*(?P<dot>\.)?"
    r"|\\(?P<style>displaystyle|textstyle)(?![a-zA-Z])\s*"
    r"|\\(?P<space>[,;:>\s]|q?quad(?![a-zA-Z])|enspace(?![a-zA-Z])|thinspace(?![a-zA-Z]))"
    r"|\\(?P<neg>!)"
)

_MATH_ENVS = "align|equation|gather|multline|eqnarray|displaymath"
_OPEN = re.compile(r"\\\\|\\\$|\$\$|\$|\\\[|\\\(|\\begin\{(?P<env>" + _MATH_ENVS + r")\*?\}")
_DOLLAR = re.compile(r"\\\\|\\\$|\$")
_TEXT_GROUP = re.compile(
    r"\\(?P<name>text|textbf|textit|textrm|textsf|texttt|textnormal|mbox|hbox|emph)\s*\{"
)
_CONTROL_WORD = re.compile(r"\\[a-zA-Z]+")
_PROSE = re.compile(r"[A-Za-z]{2,}[.,;:!?]?\s+[A-Za-z]{2,}[.,;:!?]?\s+[A-Za-z]{2,}")
_WORD_AFTER_SPACE = re.compile(r"\s[A-Za-z]{2,}\b")
_SCRIPT = re.compile(r"([\^_])\{\s*([A-Za-z0-9])\s*\}")
_SCRIPT_GLUED = re.compile(r"(?<=[\^_][A-Za-z0-9])(?=[A-Za-z0-9])")
_FRAC_DIGITS = re.compile(r"\\frac\s*(\d)\s*(\d)")
_TIE = re.compile(r"(?<=[^\W\d_]|\.)~(?=[\w$\\])")
_WHITESPACE = re.compile(r"\s+")
_SPACE_PUNCT = re.compile(r"^\s+(?=[.,;:?!)])")
_PARAGRAPH = re.compile(r"\s*\n\s*\n\s*")
# A whole whitespace run in math that touches a non-alphanumeric character or an end.
_MATH_DROP = re.compile(r"(?<!\s)(?:(?<![^\W_])\s++|\s++(?![^\W_]))")

_TOKEN = re.compile(r"\\[^\W\d_]+|\d+(?:\.\d+)?|[^\W\d_]+|[-+*/=<>^_|%]")
_FORMATTING_NAMES = "text textbf textit textrm textsf textnormal mbox hbox emph mathrm"
_FORMATTING = frozenset("\\" + name for name in _FORMATTING_NAMES.split())


def normalize_statement(text: str) -> str:
    """The statement with its meaning unchanged and its spelling canonical.

    Rules, in order:

    1. Unicode NFKC (full-width digits and letters become ASCII, ``¾`` ``3⁄4``); curly
       quotes become straight ones, the minus sign U+2212 a hyphen-minus, the fraction
       slash U+2044 ``/``.
    2. ``[asy]...[/asy]`` blocks are code: each line's whitespace is collapsed, blank
       lines dropped, line breaks kept (an Asymptote ``//`` comment ends at one), and
       nothing else below applies to them. A block starts and ends a line.
    3. LaTeX commands: ``\\dfrac``/``\\tfrac`` become ``\\frac`` (``\\dbinom``/``\\tbinom``
       ``\\binom``); ``\\left``, ``\\right``, ``\\middle`` and ``\\big``-style sizes are
       dropped (``\\left.``/``\\right.`` entirely); ``\\displaystyle``/``\\textstyle``
       dropped; the spaces ``\\,`` ``\\;`` ``\\:`` ``\\>`` ``\\ `` ``\\quad`` ``\\qquad``
       ``\\enspace`` ``\\thinspace`` become a space and ``\\!`` nothing.
    4. Math (``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]`` and the ``align``,
       ``equation``, ``gather``, ``multline``, ``eqnarray`` environments): ``~`` is a
       space; whitespace is removed unless it stands between two letters or digits,
       where it becomes one space (so ``$ x + 1 = 2 $`` is ``$x+1=2$`` and ``\\cdot x``
       keeps its space); ``^{c}`` and ``_{c}`` of one letter or digit become ``^c``,
       ``_c``, and a one-character script glued to a letter or digit gets the space
       that shows where TeX ends it (``x^2y`` and ``x^{2}y`` are ``x^2 y``, ``\\log_264``
       is ``\\log_2 64``); ``\\frac12`` becomes ``\\frac{1}{2}``. The text of ``\\text{...}`` (and
       ``\\mbox``, ``\\textbf`` ...) keeps its spaces, collapsed. A ``$`` is a currency
       sign, not math, when its span reads as prose (three words in a row, or a number
       followed by a word), or when it opens a number and its closing ``$`` is followed
       by a digit (``$5 or $6``).
    5. Prose: a LaTeX tie ``~`` between a letter (or ``.``) and a word, ``$`` or ``\\``
       becomes a space (``~5`` or ``5~10`` are kept); whitespace between the end of
       math and a following ``. , ; : ? ! )`` is removed (``$15$ .``); a whitespace run
       holding a blank line becomes one blank line ``"\\n\\n"`` (a paragraph break, as
       in Markdown), any other run one space; the result is stripped. So the result is
       a fixed point: normalizing it again changes nothing.

    Case, punctuation and the words are kept: ``x`` and ``X`` can be different variables.

    >>> normalize_statement("Janet\u2019s ducks lay １６ eggs.\\n\\n  She eats $3 and $ x $.")
    "Janet's ducks lay 16 eggs.\\n\\nShe eats $3 and $x$."
    >>> normalize_statement(r"$0 \\le \\theta < 2 \\pi$, \\( \\sin 2x \\), $5\\text{ cm}$")
    '$0\\\\le\\\\theta<2\\\\pi$, \\\\(\\\\sin 2x\\\\), $5\\\\text{ cm}$'
    """
    text = unicodedata.normalize("NFKC", text).translate(_PLAIN)
    pieces: list[str] = []
    pos = 0
    for block in _ASY.finditer(text):
        before = _normalize_latex(text[pos : block.start()])
        if pieces:  # right after a block: a line break, not a space
            before = _line_break(before, start=True)
        pieces.append(_line_break(before, start=False))
        pieces.append(_normalize_code(block.group(0)))
        pos = block.end()
    rest = _normalize_latex(text[pos:])
    pieces.append(_line_break(rest, start=True) if pieces else rest)
    return "".join(pieces).strip()


def _line_break(prose: str, *, start: bool) -> str:
    """``prose`` with a lone space at its start (or end) turned into a line break."""
    if start:
        return "\n" + prose[1:] if prose.startswith(" ") else prose
    return prose[:-1] + "\n" if prose.endswith(" ") else prose


def _normalize_code(block: str) -> str:
    lines = (" ".join(line.split()) for line in block.splitlines())
    return "\n".join(line for line in lines if line)


def _normalize_latex(text: str) -> str:
    text = _TIE.sub(" ", _COMMANDS.sub(_command, text))
    out: list[str] = []
    pos = prose_start = 0
    while (m := _OPEN.search(text, pos)) is not None:
        opener = m.group(0)
        close = None if opener in ("\\\\", "\\$") else _closing(text, m)
        if close is None:
            pos = m.end()
            continue
        start, end = close
        if opener == "$" and _is_currency(text[m.end() : start], text[end : end + 1]):
            pos = m.end()
            continue
        out.append(_normalize_prose(text[prose_start : m.start()], after_math=bool(out)))
        out.append(opener + _normalize_math(text[m.end() : start]) + text[start:end])
        pos = prose_start = end
    out.append(_normalize_prose(text[prose_start:], after_math=bool(out)))
    return "".join(out)


def _command(m: re.Match[str]) -> str:
    if m.group("esc"):
        return m.group(0)
    if m.group("frac"):
        return "\\" + m.group("frac")[1:]
    if m.group("space"):
        return " "
    return ""  # delimiter sizes, \left. \right., display styles, \!


def _closing(text: str, m: re.Match[str]) -> tuple[int, int] | None:
    """Where the math opened by ``m`` closes, as (start, end) of its closing delimiter."""
    opener = m.group(0)
    if opener == "$":
        for d in _DOLLAR.finditer(text, m.end()):
            if d.group(0) == "$":
                return d.start(), d.end()
        return None
    if opener == "$$":
        closer = "$$"
    elif opener in ("\\[", "\\("):
        closer = "\\]" if opener == "\\[" else "\\)"
    else:
        closer = "\\end{" + opener[len("\\begin{") :]
    start = text.find(closer, m.end())
    return None if start < 0 else (start, start + len(closer))


def _is_currency(body: str, after: str) -> bool:
    """Whether a ``$...$`` span is a currency sign with prose after it, not math."""
    if after.isdigit() and body.lstrip()[:1].isdigit():
        return True  # "$5 or $6", not "$\\$$1500"
    bare = _CONTROL_WORD.sub(" ", _strip_text_groups(body))
    if _PROSE.search(bare):
        return True
    return body[:1].isdigit() and _WORD_AFTER_SPACE.search(bare) is not None


def _strip_text_groups(body: str) -> str:
    pieces: list[str] = []
    pos = 0
    while (m := _TEXT_GROUP.search(body, pos)) is not None:
        end = closing_brace(body, m.end())
        if end is None:
            break
        pieces.append(body[pos : m.start()])
        pos = end
    pieces.append(body[pos:])
    return " ".join(pieces)


def _normalize_math(body: str) -> str:
    pieces: list[str] = []
    pos = 0
    while (m := _TEXT_GROUP.search(body, pos)) is not None:
        end = closing_brace(body, m.end())
        if end is None:
            break
        pieces.append(_squeeze_math(body[pos : m.start()]))
        inner = _WHITESPACE.sub(" ", body[m.end() : end - 1])
        pieces.append(f"\\{m.group('name')}{{{inner}}}")
        pos = end
    pieces.append(_squeeze_math(body[pos:]))
    return "".join(pieces)


def _squeeze_math(math: str) -> str:
    math = _SCRIPT.sub(r"\1\2", math.replace("~", " "))
    math = _SCRIPT_GLUED.sub(" ", math)  # x^2y is x^2 y (TeX takes one token)
    math = _MATH_DROP.sub("", math)
    math = _WHITESPACE.sub(" ", math)  # what is left stands between two alphanumerics
    return _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", math)


def _normalize_prose(prose: str, *, after_math: bool) -> str:
    if after_math:
        prose = _SPACE_PUNCT.sub("", prose, count=1)
    return "\n\n".join(_WHITESPACE.sub(" ", p) for p in _PARAGRAPH.split(prose))


_LIST_COMMA = re.compile(r",(?!\d{3}(?:\D|$))")
"""A comma that is not a thousands separator (``1,000`` has one; ``-2,1`` and ``1, 2``
are lists of values)."""


def normalize_answer(answer: str | None) -> str | None:
    """One spelling per answer: the grader's :func:`~mathmill.grading.normalize.normalize`
    (``\\$``, ``\\text{}`` units, degrees, thousands separators, ``\\dfrac`` ...), then
    any exact number in one form: an integer without ``.0`` or leading zeros, otherwise
    a reduced fraction ``a/b`` (``0.5``, ``1/2``, ``2/4``, ``\\frac{1}{2}``, ``\\dfrac12``
    are all ``1/2``). A percentage keeps a trailing ``%``. Other answers keep the
    normalizer's output. None, and an answer that normalizes to nothing, give None.

    >>> [normalize_answer(a) for a in ("1,000", "1000.0", r"\\$1{,}000", "016", "-0.75")]
    ['1000', '1000', '1000', '16', '-3/4']
    >>> normalize_answer(r"50\\%"), normalize_answer(r"\\left( 3, \\frac{\\pi}{2} \\right)")
    ('50%', '( 3, \\\\frac{\\\\pi}{2} )')
    """
    if answer is None:
        return None
    plain = unicodedata.normalize("NFKC", answer).translate(_PLAIN)
    text, percent = normalize(plain)
    if not text:
        return None
    if _LIST_COMMA.search(plain.replace("{,}", "")) and "," not in text:
        # "-2,1": a list of values, which the normalizer read as a decimal comma: the
        # answer is kept as written (whitespace collapsed)
        return " ".join(plain.split())
    value = parse_number(text)
    if value is not None:
        text = str(value)  # Fraction: "3" or "-3/4", always reduced
    return text + "%" if percent else text


def match_key(text: str) -> str:
    """The normalized statement as lower-cased tokens joined by single spaces: words,
    numbers (``2.5`` is one token), LaTeX control words (``\\frac``) and the operators
    ``+ - * / = < > ^ _ | %``. Punctuation, brackets, braces, ``$`` and the formatting
    commands ``\\text`` ``\\textbf`` ``\\mbox`` ``\\mathrm`` ... are dropped, so copies that
    differ in case, punctuation or math delimiters share a key. Used for exact-duplicate
    hashing (:func:`content_hash`) and, split on spaces, for word n-grams.

    >>> match_key("Janet's ducks lay 16 eggs. She sells them at \\\\$2.50 each!")
    'janet s ducks lay 16 eggs she sells them at 2.50 each'
    """
    return normalized_match_key(normalize_statement(text))


def normalized_match_key(normalized: str) -> str:
    """:func:`match_key` of a text already through :func:`normalize_statement`."""
    tokens = _TOKEN.findall(normalized.lower())
    return " ".join(t for t in tokens if t not in _FORMATTING)


def content_hash(text: str) -> str:
    """The 128-bit xxh3 hex digest of :func:`match_key`: equal for exact duplicates.

    >>> content_hash("Find $x$.") == content_hash("find  x") != content_hash("Find y.")
    True
    """
    return key_hash(match_key(text))


def key_hash(key: str) -> str:
    """The hex digest :func:`content_hash` gives, from an already computed match key."""
    return xxhash.xxh3_128_hexdigest(key.encode("utf-8"))
