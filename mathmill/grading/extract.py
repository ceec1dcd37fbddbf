"""Final-answer extraction from model text.

>>> extract_answer(r"so the area is \\boxed{\\frac{3}{4}}.")
ExtractedAnswer(text='\\\\frac{3}{4}', how='boxed')
>>> extract_answer("<final_answer>42</final_answer>").text
'42'
>>> extract_answer("The answer is (C).").text
'C'
>>> extract_answer("Checking each option, only (C) works, so not A.")
ExtractedAnswer(text='C', how='choice')
>>> extract_answer("正确答案为（C）").text
'C'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mathmill.grading.choices import find_choice
from mathmill.grading.normalize import closing_brace

__all__ = ["ExtractedAnswer", "extract_answer", "last_boxed"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TAG = re.compile(r"<final_answer>(.*?)</final_answer>", re.DOTALL | re.IGNORECASE)
_PHRASE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*(?:\$)?(.+?)(?:\$)?\s*(?:\.\s|\.$|\n|$)",
    re.IGNORECASE,
)
_NEGATED = re.compile(r"(?:not|n't)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class ExtractedAnswer:
    """The answer text and how it was found."""

    text: str
    how: str


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}``, nested braces included."""
    result = None
    for match in _BOXED.finditer(text):
        end = closing_brace(text, match.end())
        if end is not None:
            result = text[match.end() : end - 1]
    return result


def extract_answer(text: str | None, *, number_fallback: bool = True) -> ExtractedAnswer | None:
    """The final answer in ``text``: the last boxed expression, a ``<final_answer>``
    tag, a multiple-choice answer statement ("the answer is (C)", "Answer: **D**",
    "答案是 D", "la réponse est B"), a "final answer is" phrase, a decisive choice
    ("only (C) works", "option C is correct"; negated letters such as "not A" are
    ignored), or (optionally) the last number. None when there is none.
    """
    if not text or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return ExtractedAnswer(boxed.strip(), "boxed")
    tags = _TAG.findall(text)
    if tags and tags[-1].strip():
        inner = tags[-1].strip()
        return ExtractedAnswer(last_boxed(inner) or inner, "tag")
    choice = find_choice(text, min_level=3)
    if choice:
        return ExtractedAnswer(choice, "choice")
    phrases = _PHRASE.findall(text)
    if phrases and phrases[-1].strip():
        phrase = phrases[-1].strip().rstrip(".")
        choice = find_choice(phrase) if _NEGATED.match(phrase) else None
        if choice:  # "the answer is not A; it is (B)"
            return ExtractedAnswer(choice, "choice")
        return ExtractedAnswer(phrase, "phrase")
    choice = find_choice(text, min_level=2)
    if choice:
        return ExtractedAnswer(choice, "choice")
    if number_fallback:
        numbers = _NUMBER.findall(text)
        if numbers:
            return ExtractedAnswer(numbers[-1], "last_number")
    return None
