"""Where model-written code runs, and its limits: the flows' ``sandbox`` parameter
(:class:`SandboxOptions`) and the ``SandboxEndpoint`` block (:mod:`mathmill.blocks.sandbox`)
both derive from :class:`SandboxSettings`, so each setting is declared once.

>>> SandboxOptions(timeout_s=5).limits.timeout_s
5.0
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mathmill.sandbox.limits import Limits

__all__ = ["SandboxOptions", "SandboxSettings"]


class SandboxSettings(BaseModel):
    """The sandbox's backend and limits. A mixin without a config of its own, so that a
    Prefect block can derive from it.
    """

    backend: Literal["local", "http", "docker"] = Field(
        "local",
        description="'local': fork server on the worker; 'http': a sandbox server; "
        "'docker': a container of the sandbox image per run.",
    )
    url: str | None = Field(
        None,
        description="Base URL of the sandbox server (backend 'http'); several, comma-"
        "separated, are replicas: runs go to the least busy, each session stays on its own.",
        examples=["http://sandbox:8090", "http://sb-1:8090,http://sb-2:8090"],
    )
    image: str | None = Field(
        None, description="Sandbox image (backend 'docker').", examples=["mathmill-sandbox:0.1.0"]
    )
    replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="Containers to start (backend 'docker'): runs go to the least busy, "
        "each session stays on its own.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Sandbox processes (local: default two per core; docker: per "
        "container, default 2).",
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="Wall-clock limit per run, seconds.")
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


class SandboxOptions(SandboxSettings):
    """Where model-written code runs, and its limits (a flow parameter)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Name of a saved 'mathmill sandbox' block; its settings replace the "
        "ones above.",
        examples=["sandbox-pool"],
    )
