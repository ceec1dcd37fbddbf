"""Parameter models shared by the flows: models per role, the sandbox, run options.

They are strict pydantic models (``extra="forbid"``, bounded fields with descriptions)
so the Prefect UI renders them as forms and a bad value fails before the first LLM
call, naming the field. API keys are never parameters: a role names the environment
variable that holds its key.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mathmill.errors import ConfigError
from mathmill.llm.config import EndpointConfig, StructuredMode
from mathmill.sandbox.limits import Limits

__all__ = ["ModelRole", "SandboxOptions", "resolve_role"]

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ModelRole(BaseModel):
    """Which model plays a role, and how to call it. Unset fields fall back to the
    flow's default model, then to the role's built-in sampling defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = Field(
        None,
        description="OpenAI-compatible base URL ending in /v1; unset = the default model "
        "(the embedded local model when no default is set).",
        examples=["http://127.0.0.1:8000/v1", "https://openrouter.ai/api/v1"],
    )
    model: str | None = Field(None, description="Model name.", examples=["gpt-4o-mini"])
    api_key_env: str | None = Field(
        None,
        pattern=_ENV_NAME,
        description="Name of the environment variable holding the API key (never the key).",
        examples=["OPENAI_API_KEY"],
    )
    max_concurrency: int | None = Field(
        None, ge=1, le=4096, description="Requests in flight to this endpoint."
    )
    timeout_s: float | None = Field(None, gt=0, le=3600, description="Per-request timeout.")
    max_retries: int | None = Field(None, ge=0, le=20, description="Retries per request.")
    structured_mode: StructuredMode | None = Field(
        None, description="'json_schema' (OpenAI, vLLM) or 'json_object' (llama.cpp)."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int | None = Field(None, ge=16, le=131072, description="Tokens per reply.")

    def over(self, default: ModelRole) -> ModelRole:
        """This role with its unset fields taken from ``default``."""
        merged = default.model_dump(exclude_none=True) | self.model_dump(exclude_none=True)
        return ModelRole(**merged)


def resolve_role(role: ModelRole, name: str, embedded: EndpointConfig | None) -> EndpointConfig:
    """The endpoint a (merged) role calls: its own base URL, or the embedded model's.

    Raises :class:`ConfigError` naming the role when its key variable is unset.
    """
    if role.base_url is None:
        if embedded is None:
            raise ConfigError(f"models.{name}: no base_url and no embedded model")
        base = embedded
    else:
        key = SecretStr("EMPTY")
        if role.api_key_env:
            value = os.environ.get(role.api_key_env)
            if not value:
                raise ConfigError(
                    f"models.{name}.api_key_env: environment variable {role.api_key_env} is unset"
                )
            key = SecretStr(value)
        if not role.model:
            raise ConfigError(f"models.{name}.model: required with base_url {role.base_url}")
        base = EndpointConfig(base_url=role.base_url, model=role.model, api_key=key)
    update: dict[str, object] = {"name": f"{name}:{role.model or base.model}"}
    for field in ("max_concurrency", "timeout_s", "max_retries", "structured_mode"):
        value = getattr(role, field)
        if value is not None and not (role.base_url is None and field == "max_concurrency"):
            update[field] = value
    if role.model and role.base_url is not None:
        update["model"] = role.model
    return base.model_copy(update=update)


class SandboxOptions(BaseModel):
    """Where model-written code runs, and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["local", "http"] = Field(
        "local", description="'local': fork server on this machine; 'http': a sandbox server."
    )
    url: str | None = Field(
        None,
        description="Base URL of the sandbox server (backend 'http').",
        examples=["http://sandbox:8090"],
    )
    workers: int | None = Field(
        None, ge=1, le=256, description="Local sandbox processes (default: one per core)."
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="Wall-clock limit per run.")
    memory_mb: int = Field(1024, ge=64, le=65536, description="Memory per run, MiB.")
    max_sessions: int = Field(
        16,
        ge=1,
        le=1024,
        description="Stateful sessions open at once (tir trajectories in flight); each "
        "holds a process of about 20 MiB.",
    )

    @property
    def limits(self) -> Limits:
        """As sandbox :class:`Limits`."""
        return Limits(timeout_s=self.timeout_s, memory_mb=self.memory_mb)
