"""Prefect blocks of mathmill: ``LLMEndpoint``, ``SandboxEndpoint``, and run directories in
Prefect's or prefect-aws's storage blocks. ``mathmill blocks register`` (or
:func:`register_blocks`) makes their types appear in the UI's block catalog.
"""

from __future__ import annotations

from typing import Any

from mathmill.blocks.llm import LLMEndpoint
from mathmill.blocks.sandbox import SandboxEndpoint
from mathmill.blocks.storage import block_ref, load_storage, storage_from_block

__all__ = [
    "LLMEndpoint",
    "SandboxEndpoint",
    "block_ref",
    "block_types",
    "load_storage",
    "register_blocks",
    "storage_from_block",
]


def block_types() -> list[type[Any]]:
    """The block types ``register_blocks`` registers: mathmill's, then prefect-aws's
    S3 ones (when the ``s3`` extra is installed).
    """
    types: list[type[Any]] = [LLMEndpoint, SandboxEndpoint]
    try:
        from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket
    except ImportError:
        return types
    return [*types, AwsCredentials, MinIOCredentials, S3Bucket]


async def register_blocks() -> list[str]:
    """Register the block types (and their schemas) on the Prefect server; their slugs."""
    slugs = []
    for block_type in block_types():
        await block_type.aregister_type_and_schema()
        slugs.append(block_type.get_block_type_slug())
    return slugs
