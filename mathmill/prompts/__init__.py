"""Prompt templates, stored as files next to this module.

A template's id is its file name without extension; its SHA-256 is recorded on
every row it produced (:class:`~mathmill.records.PromptRef`), so a changed prompt
is visible in the data and invalidates cached results.

>>> p = load_prompt("synth_long_cot")
>>> p.ref.template_id, len(p.ref.sha256)
('synth_long_cot', 64)
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from functools import cache
from importlib import resources

from mathmill.errors import ConfigError
from mathmill.records import PromptRef

__all__ = ["Prompt", "load_prompt"]


@dataclass(frozen=True)
class Prompt:
    """A prompt template: ``$name`` placeholders, filled with :meth:`render`."""

    ref: PromptRef
    text: str

    def render(self, **values: object) -> str:
        """The template with every ``$name`` replaced; a missing value is an error."""
        try:
            return string.Template(self.text).substitute({k: str(v) for k, v in values.items()})
        except KeyError as e:
            raise ConfigError(f"prompt {self.ref.template_id!r} needs a value for {e}") from e


@cache
def load_prompt(template_id: str) -> Prompt:
    """Load ``mathmill/prompts/<template_id>.md``."""
    try:
        text = resources.files(__package__).joinpath(f"{template_id}.md").read_text("utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"no prompt template {template_id!r} in mathmill/prompts") from e
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Prompt(PromptRef(template_id=template_id, sha256=sha), text)
