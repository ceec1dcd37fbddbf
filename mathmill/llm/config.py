"""Endpoint configuration: where an OpenAI-compatible model lives and how to call it."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["EndpointConfig", "Price", "StructuredMode", "endpoint_from_env"]

StructuredMode = Literal["json_schema", "json_object"]


class Price(BaseModel):
    """USD per one million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: float = Field(0.0, ge=0.0, description="USD per 1M prompt tokens.")
    output_per_1m: float = Field(0.0, ge=0.0, description="USD per 1M completion tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Cost in USD of a call with these token counts."""
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


class EndpointConfig(BaseModel):
    """An OpenAI-compatible endpoint (OpenAI, OpenRouter, vLLM, llama.cpp, ...).

    The API key is a ``SecretStr``: it is never printed, logged or serialized in clear.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(
        description="Base URL of the OpenAI-compatible API, ending in /v1.",
        examples=["https://api.openai.com/v1", "http://127.0.0.1:8000/v1"],
    )
    model: str = Field(description="Model name sent with each request.", examples=["gpt-4o-mini"])
    api_key: SecretStr = Field(
        SecretStr("EMPTY"), description="API key; local servers accept any value."
    )
    max_concurrency: int = Field(
        16, ge=1, le=4096, description="Requests in flight at once to this endpoint."
    )
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Per-request timeout in seconds.")
    max_retries: int = Field(
        4, ge=0, le=20, description="Retries on 429, 5xx, timeouts and connection errors."
    )
    max_backoff_s: float = Field(
        30.0, gt=0, le=600, description="Longest wait between retries (Retry-After capped here)."
    )
    structured_mode: StructuredMode = Field(
        "json_schema",
        description="How to ask for JSON: OpenAI 'json_schema', or 'json_object' plus a "
        "schema (llama.cpp).",
    )
    price: Price | None = Field(None, description="Token prices for cost accounting.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra JSON fields sent with every request (e.g. vLLM's top_k).",
    )
    concurrency_limit: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$",
        description="Name of a Prefect global concurrency limit that sets max_concurrency "
        "live: change it in the UI or CLI and running flows follow (created when missing).",
        examples=["llm-openrouter"],
    )
    name: str | None = Field(None, description="Label shown in reports; defaults to the model.")
    cache_id: str | None = Field(
        None,
        description="Identity of the server in the LLM call cache and in chunk keys "
        "(the embedded model sets one); see cache_by_url.",
    )
    cache_by_url: bool = Field(
        False,
        description="Key cached calls and finished chunks on the base URL as well as the "
        "model and request. Off (default): a resume after the endpoint moved (new port, "
        "another replica of the same model) replays every finished call; on: when "
        "different servers answer differently under one model name.",
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
        """Which server and model answer (:attr:`cache_scope` and the model). Part of
        chunk keys; holds no secret.
        """
        return f"{self.cache_scope}|{self.model}"

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
