"""``LLMEndpoint``: an OpenAI-compatible endpoint saved on the Prefect server.

Create one in the UI (*Blocks → + → mathmill LLM endpoint*) or in Python::

    LLMEndpoint(base_url="https://openrouter.ai/api/v1", model="qwen/qwen3-32b",
                api_key="sk-...", max_concurrency=32).save("openrouter")

and name it in a flow's parameters (``models.default.block: openrouter``). The key is
a ``SecretStr``: the UI and API show it masked, logs and datasets never hold it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from mathmill.llm.config import (
    INPUT_PRICE,
    OUTPUT_PRICE,
    EndpointConfig,
    EndpointFields,
    Price,
)

__all__ = ["LLMEndpoint"]


class LLMEndpoint(Block, EndpointFields):
    """An OpenAI-compatible endpoint (OpenAI, OpenRouter, vLLM, llama.cpp, ...) for mathmill
    flows, with its key, concurrency, timeout and prices. The settings it shares with the
    client's :class:`EndpointConfig` come from :class:`EndpointFields`.
    """

    _block_type_name: ClassVar[str] = "mathmill LLM endpoint"
    _block_type_slug: ClassVar[str] = "mathmill-llm-endpoint"
    _description: ClassVar[str] = (
        "An OpenAI-compatible LLM endpoint for mathmill flows: base URL, model, API key, "
        "concurrency (live through a global concurrency limit), timeout and prices."
    )

    live_concurrency: bool = Field(
        True,
        description="Follow the global concurrency limit 'llm-<block name>' while running "
        "(created with max_concurrency); change it in Concurrency to tune running flows.",
    )
    input_price_per_1m: Annotated[float, INPUT_PRICE] = 0.0
    output_price_per_1m: Annotated[float, OUTPUT_PRICE] = 0.0

    def limit_name(self, name: str | None = None) -> str | None:
        """The global concurrency limit this endpoint follows (None when not live)."""
        name = name or self._block_document_name
        if not self.live_concurrency or not name:
            return None
        return f"llm-{name}"

    def endpoint(self, name: str | None = None) -> EndpointConfig:
        """As the client's :class:`EndpointConfig`; ``name`` is the block's name
        (taken from the loaded document when not given).
        """
        price = None
        if self.input_price_per_1m or self.output_price_per_1m:
            price = Price(
                input_per_1m=self.input_price_per_1m, output_per_1m=self.output_price_per_1m
            )
        fields = self.model_dump(include=set(EndpointFields.model_fields))
        return EndpointConfig(
            **fields | {"api_key": self.api_key or SecretStr("EMPTY")},
            price=price,
            concurrency_limit=self.limit_name(name),
            name=name or self._block_document_name,
        )
