"""``LLMEndpoint``: an OpenAI-compatible endpoint saved on the Prefect server.

Create one in the UI (*Blocks → + → mathmill LLM endpoint*) or in Python::

    LLMEndpoint(base_url="https://openrouter.ai/api/v1", model="qwen/qwen3-32b",
                api_key="sk-...", max_concurrency=32).save("openrouter")

and name it in a flow's parameters (``models.default.block: openrouter``). The key is
a ``SecretStr``: the UI and API show it masked, logs and datasets never hold it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from mathmill.llm.config import EndpointConfig, Price, StructuredMode

__all__ = ["LLMEndpoint"]


class LLMEndpoint(Block):
    """An OpenAI-compatible endpoint (OpenAI, OpenRouter, vLLM, llama.cpp, ...) for mathmill
    flows, with its key, concurrency, timeout and prices.
    """

    _block_type_name: ClassVar[str] = "mathmill LLM endpoint"
    _block_type_slug: ClassVar[str] = "mathmill-llm-endpoint"
    _description: ClassVar[str] = (
        "An OpenAI-compatible LLM endpoint for mathmill flows: base URL, model, API key, "
        "concurrency (live through a global concurrency limit), timeout and prices."
    )

    base_url: str = Field(
        description="Base URL of the OpenAI-compatible API, ending in /v1.",
        examples=["https://api.openai.com/v1", "http://vllm:8000/v1"],
    )
    model: str = Field(description="Model name sent with each request.", examples=["gpt-4o-mini"])
    api_key: SecretStr | None = Field(
        None, description="API key (stored encrypted, shown masked). Empty for local servers."
    )
    max_concurrency: int = Field(
        16,
        ge=1,
        le=4096,
        description="Requests in flight per flow run; the starting value of the live limit.",
    )
    live_concurrency: bool = Field(
        True,
        description="Follow the global concurrency limit 'llm-<block name>' while running "
        "(created with max_concurrency); change it in Concurrency to tune running flows.",
    )
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Per-request timeout, seconds.")
    max_retries: int = Field(4, ge=0, le=20, description="Retries on 429, 5xx and timeouts.")
    structured_mode: StructuredMode = Field(
        "json_schema",
        description="'json_schema' (OpenAI, vLLM) or 'json_object' plus a schema (llama.cpp).",
    )
    input_price_per_1m: float = Field(0.0, ge=0, description="USD per 1M prompt tokens.")
    output_price_per_1m: float = Field(0.0, ge=0, description="USD per 1M completion tokens.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra JSON fields sent with every request.",
        examples=[{"top_k": 20}],
    )
    cache_by_url: bool = Field(
        False,
        description="Key cached calls on the base URL too (off: a resume after the server "
        "moved replays finished calls of the same model).",
    )

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
        return EndpointConfig(
            base_url=self.base_url,
            model=self.model,
            api_key=self.api_key or SecretStr("EMPTY"),
            max_concurrency=self.max_concurrency,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            structured_mode=self.structured_mode,
            price=price,
            extra_body=dict(self.extra_body),
            cache_by_url=self.cache_by_url,
            concurrency_limit=self.limit_name(name),
            name=name or self._block_document_name,
        )
