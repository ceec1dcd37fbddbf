"""Loading a saved block by name, with an error that names the parameter."""

from __future__ import annotations

from typing import Any, TypeVar

from mathmill.errors import ConfigError

__all__ = ["load_block"]

B = TypeVar("B")


async def load_block(block_type: type[B], name: str, field: str) -> B:
    """The block ``name`` (``slug/name`` when ``block_type`` is Prefect's base
    ``Block``); a missing one is a :class:`ConfigError` naming ``field``.
    """
    typed: Any = block_type
    try:
        loaded: B = await typed.aload(name)
    except ValueError as e:  # Prefect: "Unable to find block document named ..."
        what = name if "/" in name else f"{typed.get_block_type_slug()}/{name}"
        raise ConfigError(f"{field}: no block {what!r} on the Prefect server") from e
    return loaded
