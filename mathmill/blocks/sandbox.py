"""``SandboxEndpoint``: where model-written code runs, saved on the Prefect server."""

from __future__ import annotations

from typing import ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field

from mathmill.flows.options import SandboxOptions

__all__ = ["SandboxEndpoint"]


class SandboxEndpoint(Block):
    """The sandbox of mathmill flows: the local fork server, a sandbox server over HTTP
    (the image in ``sandbox_image/``, several replicas), or a Docker
    container started per run; with its limits.
    """

    _block_type_name: ClassVar[str] = "mathmill sandbox"
    _block_type_slug: ClassVar[str] = "mathmill-sandbox"
    _description: ClassVar[str] = (
        "Where mathmill runs model-written code (local fork server, HTTP sandbox server, "
        "Docker) and its limits."
    )

    backend: Literal["local", "http", "docker"] = Field(
        "local",
        description="'local': fork server on the worker; 'http': a sandbox server; "
        "'docker': a container of the sandbox image per run.",
    )
    url: str | None = Field(
        None,
        description="Sandbox server base URL (backend 'http'); several, comma-separated, "
        "are replicas (runs to the least busy, each session pinned to its own).",
        examples=["http://sandbox:8090", "http://sb-1:8090,http://sb-2:8090"],
    )
    image: str | None = Field(
        None, description="Sandbox image (backend 'docker').", examples=["mathmill-sandbox:0.1.0"]
    )
    replicas: int = Field(1, ge=1, le=64, description="Containers to start (backend 'docker').")
    workers: int | None = Field(
        None, ge=1, le=256, description="Local sandbox processes (default: two per core)."
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="Wall-clock limit per run, seconds.")
    memory_mb: int = Field(1024, ge=64, le=65536, description="Memory per run, MiB.")
    max_sessions: int = Field(16, ge=1, le=1024, description="Stateful sessions open at once.")

    def options(self) -> SandboxOptions:
        """As the flows' :class:`SandboxOptions`."""
        return SandboxOptions(**self.model_dump(include=set(SandboxOptions.model_fields)))
