"""Structured output: ask for JSON that fits a pydantic model, and parse it tolerantly.

Building a model's JSON schema costs ~0.1-0.5 ms, so the request field and the hint
are built once per (model class, mode) and kept as JSON text (an immutable string):
each :func:`response_format` call returns a fresh dict decoded from it (~2 us), so a
caller that changes what it got cannot change what the next call sends.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mathmill.llm.config import StructuredMode

__all__ = ["extract_json", "parse_reply", "repair_message", "response_format", "schema_hint"]

T = TypeVar("T", bound=BaseModel)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def response_format(model: type[BaseModel], mode: StructuredMode) -> dict[str, Any]:
    """The ``response_format`` request field for ``model`` in the endpoint's mode: a
    new dict on every call (the caller may change it), built from a cached schema.

    >>> from pydantic import BaseModel
    >>> class A(BaseModel):
    ...     x: int
    >>> response_format(A, "json_object")["type"]
    'json_object'
    >>> response_format(A, "json_schema") is response_format(A, "json_schema")
    False
    """
    return json.loads(_response_format_json(model, mode))  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=512)
def _response_format_json(model: type[BaseModel], mode: StructuredMode) -> str:
    schema = model.model_json_schema()
    if mode == "json_schema":
        field = {
            "type": "json_schema",
            "json_schema": {"name": model.__name__, "schema": schema, "strict": False},
        }
    else:
        field = {"type": "json_object", "schema": schema}
    return json.dumps(field)


@functools.lru_cache(maxsize=512)
def schema_hint(model: type[BaseModel]) -> str:
    """A short instruction that names the JSON schema (helps small local models);
    cached per model class (a string, so nothing a caller does can change it).
    """
    schema = json.dumps(model.model_json_schema(), separators=(",", ":"))
    return f"Reply with a single JSON object that matches this JSON schema: {schema}"


def extract_json(text: str) -> Any:
    """The JSON value in a model reply: code fences, prose around it and raw newlines
    inside strings are tolerated. Raises ``ValueError`` when there is none.

    >>> extract_json('Sure!\\n```json\\n{"a": "two\\nlines"}\\n```')
    {'a': 'two\\nlines'}
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        candidate = candidate.strip()
        try:
            return json.loads(candidate, strict=False)
        except json.JSONDecodeError:
            pass
        start = candidate.find("{")
        end = candidate.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(candidate[start : end + 1], strict=False)
            except json.JSONDecodeError:
                pass
    raise ValueError("no JSON object found in the reply")


def parse_reply(text: str, model: type[T]) -> T:
    """Parse a reply into ``model``; raises ``ValueError`` with a short reason."""
    value = extract_json(text)
    try:
        return model.model_validate(value)
    except ValidationError as e:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise ValueError(f"JSON does not match {model.__name__}: {errors}") from e


def repair_message(error: str) -> str:
    """The user message of the one repair retry after an invalid reply."""
    return (
        f"Your reply could not be used: {error}. Reply again with only the corrected JSON "
        "object, no prose and no code fences."
    )
