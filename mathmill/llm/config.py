"""Endpoint configuration: where an OpenAI-compatible model lives and how to call it.

Each endpoint setting is described and bounded once, here (:data:`BASE_URL`,
:data:`MAX_CONCURRENCY`, ...), and :class:`EndpointFields` declares the ones every
endpoint has, with their defaults. The client's :class:`EndpointConfig` and the
``LLMEndpoint`` block (:mod:`mathmill.blocks.llm`) derive from it; the flows'
``ModelRole`` (:mod:`mathmill.flows.options`), whose fields are optional overrides,
annotates its fields with the same definitions (``Annotated[int | None,
MAX_CONCURRENCY]``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.fields import FieldInfo

__all__ = [
    "BASE_URL",
    "CACHE_BY_URL",
    "CONCURRENCY_LIMIT",
    "EXTRA_BODY",
    "INPUT_PRICE",
    "MAX_CONCURRENCY",
    "MAX_RETRIES",
    "MODEL",
    "OUTPUT_PRICE",
    "STRUCTURED_MODE",
    "TIMEOUT_S",
    "EndpointConfig",
    "EndpointFields",
    "Price",
    "StructuredMode",
    "endpoint_from_env",
]

StructuredMode = Literal["json_schema", "json_object"]

# The endpoint settings' descriptions and bounds, one definition each (see above).
BASE_URL: FieldInfo = Field(
    description="Base URL of the OpenAI-compatible API, ending in /v1.",
    examples=["https://api.openai.com/v1", "http://vllm:8000/v1"],
)
MODEL: FieldInfo = Field(description="Model name sent with each request.", examples=["gpt-4o-mini"])
MAX_CONCURRENCY: FieldInfo = Field(
    ge=1,
    le=4096,
    description="Requests in flight at once to this endpoint, per flow run; the starting "
    "value of a live concurrency limit.",
)
CONCURRENCY_LIMIT: FieldInfo = Field(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$",
    description="Name of a Prefect global concurrency limit that sets max_concurrency "
    "live: change it in the UI or CLI and running flows follow (created with "
    "max_concurrency when missing).",
    examples=["llm-openrouter"],
)
TIMEOUT_S: FieldInfo = Field(gt=0, le=3600, description="Per-request timeout, seconds.")
MAX_RETRIES: FieldInfo = Field(
    ge=0, le=20, description="Retries on 429, 5xx, timeouts and connection errors."
)
STRUCTURED_MODE: FieldInfo = Field(
    description="How to ask for JSON: 'json_schema' (OpenAI, vLLM), or 'json_object' plus "
    "a schema (llama.cpp).",
)
EXTRA_BODY: FieldInfo = Field(
    description="Extra JSON fields sent with every request (e.g. vLLM's top_k).",
    examples=[{"top_k": 20}],
)
CACHE_BY_URL: FieldInfo = Field(
    description="Key cached calls and finished chunks on the base URL as well as the "
    "model and request. Off (default): a resume after the endpoint moved (new port, "
    "another replica of the same model) replays every finished call; on: when "
    "different servers answer differently under one model name.",
)
INPUT_PRICE: FieldInfo = Field(ge=0.0, description="USD per 1M prompt tokens.")
OUTPUT_PRICE: FieldInfo = Field(ge=0.0, description="USD per 1M completion tokens.")


class Price(BaseModel):
    """USD per one million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: Annotated[float, INPUT_PRICE] = 0.0
    output_per_1m: Annotated[float, OUTPUT_PRICE] = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Cost in USD of a call with these token counts."""
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


class EndpointFields(BaseModel):
    """The settings every endpoint has, with their defaults: where it is and how to call
    it. A mixin without a config of its own, so that a Prefect block can derive from it
    (the block's ``api_key`` is optional; :class:`EndpointConfig` always holds one).
    """

    base_url: Annotated[str, BASE_URL]
    model: Annotated[str, MODEL]
    api_key: SecretStr | None = Field(
        None, description="API key (shown masked, stored encrypted). Empty for local servers."
    )
    max_concurrency: Annotated[int, MAX_CONCURRENCY] = 16
    timeout_s: Annotated[float, TIMEOUT_S] = 120.0
    max_retries: Annotated[int, MAX_RETRIES] = 4
    structured_mode: Annotated[StructuredMode, STRUCTURED_MODE] = "json_schema"
    extra_body: Annotated[dict[str, Any], EXTRA_BODY] = Field(default_factory=dict)
    cache_by_url: Annotated[bool, CACHE_BY_URL] = False


class EndpointConfig(EndpointFields):
    """An OpenAI-compatible endpoint (OpenAI, OpenRouter, vLLM, llama.cpp, ...).

    The API key is a ``SecretStr``: it is never printed, logged or serialized in clear.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: SecretStr = Field(
        SecretStr("EMPTY"), description="API key; local servers accept any value."
    )
    max_backoff_s: float = Field(
        30.0, gt=0, le=600, description="Longest wait between retries (Retry-After capped here)."
    )
    price: Price | None = Field(None, description="Token prices for cost accounting.")
    concurrency_limit: Annotated[str | None, CONCURRENCY_LIMIT] = None
    name: str | None = Field(None, description="Label shown in reports; defaults to the model.")
    cache_id: str | None = Field(
        None,
        description="Identity of the server in the LLM call cache and in chunk keys "
        "(the embedded model sets one); see cache_by_url.",
    )

    @property
    def label(self) -> str:
        """A short name for reports."""
        return self.name or self.model

    @property
    def cache_scope(self) -> str:
        """Which server answers, as far as cached work is concerned: ``cache_id``, else
        the base URL with ``cache_by_url``, else nothing (the model and the request
        decide). Holds no secret.

        >>> EndpointConfig(base_url="http://h:1/v1", model="m").cache_scope
        ''
        >>> EndpointConfig(base_url="http://h:1/v1/", model="m", cache_by_url=True).cache_scope
        'http://h:1/v1'
        """
        if self.cache_id:
            return self.cache_id
        return self.base_url.rstrip("/") if self.cache_by_url else ""

    @property
    def identity(self) -> str:
        """Which server and model answer, and how they are asked (:attr:`cache_scope`,
        the model, and the request extras and structured-output mode when set: they
        change the replies). Part of chunk keys; holds no secret.
        """
        base = f"{self.cache_scope}|{self.model}"
        if not self.extra_body and self.structured_mode == "json_schema":
            return base
        asked = json.dumps([self.extra_body, self.structured_mode], sort_keys=True, default=str)
        return f"{base}|{hashlib.sha256(asked.encode()).hexdigest()[:16]}"

    def pool_key(self) -> str:
        """Identity of the endpoint for sharing one concurrency limit (key hashed)."""
        secret = hashlib.sha256(self.api_key.get_secret_value().encode()).hexdigest()[:12]
        return f"{self.base_url.rstrip('/')}|{secret}"


def endpoint_from_env(
    base_url: str | None = None, model: str | None = None, api_key: str | None = None
) -> EndpointConfig | None:
    """An endpoint from explicit values or ``MATHMILL_BASE_URL`` / ``MATHMILL_MODEL`` /
    ``MATHMILL_API_KEY`` (falling back to ``OPENAI_*``); None when no base URL is set.
    """
    base_url = base_url or os.environ.get("MATHMILL_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        return None
    model = model or os.environ.get("MATHMILL_MODEL") or os.environ.get("OPENAI_MODEL")
    key = api_key or os.environ.get("MATHMILL_API_KEY") or os.environ.get("OPENAI_API_KEY")
    fields: dict[str, Any] = {"base_url": base_url, "model": model or ""}
    if key:
        fields["api_key"] = SecretStr(key)
    return EndpointConfig(**fields)
