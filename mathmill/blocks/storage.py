"""Run directories in Prefect storage blocks: prefect-aws ``S3Bucket`` (AWS, MinIO or any
S3-compatible server through its credentials' endpoint URL) or Prefect's own
``LocalFileSystem`` / ``RemoteFileSystem``.

A flow's ``out`` is then a path inside the block (``datasets/nightly``), and the block
also holds the flow's Prefect task results unless ``results_block`` names another.
Credentials stay in the block (secret fields); they reach only the storage client.

>>> storage_url("s3://bucket/base", "runs/a")
's3://bucket/base/runs/a'
"""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any

from pydantic import SecretStr

from mathmill.blocks.loading import load_block
from mathmill.errors import ConfigError
from mathmill.storage import StorageConfig

__all__ = ["block_ref", "load_storage", "storage_from_block", "storage_url"]

DEFAULT_SLUG = "s3-bucket"


def block_ref(name: str) -> str:
    """``slug/name`` of a storage block; a bare name means an ``s3-bucket`` block."""
    return name if "/" in name else f"{DEFAULT_SLUG}/{name}"


def storage_url(base: str, out: str) -> str:
    """``out`` under the block's base path; ``out`` must be relative and stay inside."""
    if "://" in out or out.startswith("/"):
        raise ConfigError(
            f"out: {out!r} must be a relative path inside the storage block (got a URL "
            "or an absolute path)"
        )
    clean = posixpath.normpath(out.strip("/")) if out.strip("/") else ""
    if clean.startswith(".."):
        raise ConfigError(f"out: {out!r} leaves the storage block's base path")
    base = base.rstrip("/")
    return f"{base}/{clean}" if clean and clean != "." else base


def _secret(value: Any) -> SecretStr | None:
    if value is None:
        return None
    return value if isinstance(value, SecretStr) else SecretStr(str(value))


def storage_from_block(block: Any, out: str, name: str = "") -> StorageConfig:
    """The :class:`StorageConfig` of ``out`` inside a loaded storage block."""
    kind = type(block).__name__
    if kind == "S3Bucket":
        base = f"s3://{block.bucket_name}"
        if block.bucket_folder:
            base = f"{base}/{block.bucket_folder.strip('/')}"
        creds = block.credentials
        params = creds.aws_client_parameters
        if type(creds).__name__ == "MinIOCredentials":
            key, secret = creds.minio_root_user, creds.minio_root_password
        else:
            key, secret = creds.aws_access_key_id, creds.aws_secret_access_key
        return StorageConfig(
            url=storage_url(base, out),
            endpoint_url=params.endpoint_url or None,
            key=_secret(key),
            secret=_secret(secret),
            region=creds.region_name,
        )
    if kind == "LocalFileSystem":
        return StorageConfig(url=storage_url(block.basepath or ".", out), endpoint_url=None)
    if kind == "RemoteFileSystem":
        settings = dict(block.settings or {})
        client_kwargs = settings.get("client_kwargs") or {}
        return StorageConfig(
            url=storage_url(block.basepath, out),
            endpoint_url=client_kwargs.get("endpoint_url") or settings.get("endpoint_url"),
            key=_secret(settings.get("key")),
            secret=_secret(settings.get("secret")),
            region=client_kwargs.get("region_name"),
        )
    raise ConfigError(
        f"storage_block {name!r}: a {kind} block cannot hold a run directory (use "
        "s3-bucket, local-file-system or remote-file-system)"
    )


def _import_collections() -> None:
    """Make prefect-aws's block classes known (a no-op without the ``s3`` extra)."""
    with contextlib.suppress(ImportError):
        import prefect_aws  # noqa: F401


async def load_storage(out: str, block: str | None, endpoint_url: str | None) -> StorageConfig:
    """Where a run's datasets go: ``out`` itself, or ``out`` inside ``block``."""
    if not block:
        return StorageConfig(url=out, endpoint_url=endpoint_url)
    from prefect.blocks.core import Block

    _import_collections()
    ref = block_ref(block)
    loaded = await load_block(Block, ref, "storage_block")
    return storage_from_block(loaded, out, ref)
