"""``SandboxEndpoint``: where model-written code runs, saved on the Prefect server."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block

from mathmill.sandbox.options import SandboxOptions, SandboxSettings

__all__ = ["SandboxEndpoint"]


class SandboxEndpoint(Block, SandboxSettings):
    """The sandbox of mathmill flows: the local fork server, a sandbox server over HTTP
    (the image in ``sandbox_image/``, several replicas), or a Docker
    container started per run; with its limits (those of :class:`SandboxSettings`).
    """

    _block_type_name: ClassVar[str] = "mathmill sandbox"
    _block_type_slug: ClassVar[str] = "mathmill-sandbox"
    _description: ClassVar[str] = (
        "Where mathmill runs model-written code (local fork server, HTTP sandbox server, "
        "Docker) and its limits."
    )

    def options(self) -> SandboxOptions:
        """As the flows' :class:`SandboxOptions`."""
        return SandboxOptions(**self.model_dump(include=set(SandboxSettings.model_fields)))
