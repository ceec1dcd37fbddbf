"""Opening a flow run's resources: run directory, call cache, LLM endpoints per role
(the embedded model when a role has no endpoint), and the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from mathmill.blocks.llm import LLMEndpoint
from mathmill.blocks.loading import load_block
from mathmill.blocks.sandbox import SandboxEndpoint
from mathmill.errors import ConfigError, EmbeddedModelError, MathmillError
from mathmill.flows.options import ModelRole, SandboxOptions, resolve_role
from mathmill.llm.cache import CallCache
from mathmill.llm.client import LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.live import LiveLimits
from mathmill.pipeline.chunks import Runtime
from mathmill.sandbox.protocol import Sandbox
from mathmill.storage import RunStore, StorageConfig

__all__ = ["call_cache_path", "open_runtime"]

log = logging.getLogger("mathmill.flows")


def call_cache_path(store: RunStore) -> str:
    """Where a run's LLM call cache lives: inside a local run directory; for object
    storage, under ``$MATHMILL_CACHE_DIR`` (default ``~/.cache/mathmill``) by run URL.
    """
    if store.is_local:
        return os.path.join(store.root, ".cache", "llm-calls.sqlite")
    base = os.environ.get("MATHMILL_CACHE_DIR") or os.path.join(Path.home(), ".cache", "mathmill")
    digest = hashlib.sha256(store.url.encode()).hexdigest()[:16]
    return os.path.join(base, "calls", f"{digest}.sqlite")


async def _docker_sandbox(options: SandboxOptions) -> Sandbox:
    """``options.replicas`` containers of the sandbox image (all started, or none)."""
    from mathmill.sandbox.docker import DEFAULT_IMAGE, DockerSandbox
    from mathmill.sandbox.pool import SandboxPool

    boxes = [
        DockerSandbox(
            options.image or DEFAULT_IMAGE,
            timeout_s=options.timeout_s,
            workers=options.workers or 2,
            job_memory_mb=options.memory_mb,
        )
        for _ in range(options.replicas)
    ]
    started = await asyncio.gather(*(box.start() for box in boxes), return_exceptions=True)
    failed = [e for e in started if isinstance(e, BaseException)]
    if failed:
        await asyncio.gather(*(box.close() for box in boxes), return_exceptions=True)
        raise failed[0]
    return boxes[0] if len(boxes) == 1 else SandboxPool(boxes)


async def _sandbox(options: SandboxOptions) -> Sandbox:
    """The run's sandbox (its modules imported here: a run without one, such as
    sample's, needs none of them).
    """
    from mathmill.sandbox.http import HTTPSandbox
    from mathmill.sandbox.local import LocalSandbox
    from mathmill.sandbox.pool import SandboxPool

    if options.block:
        block = await load_block(SandboxEndpoint, options.block, "sandbox.block")
        options = block.options()
    if options.backend == "http":
        urls = [u.strip() for u in (options.url or "").split(",") if u.strip()]
        if not urls:
            raise ConfigError("sandbox.url: required with backend 'http'")
        clients = [HTTPSandbox(url, timeout_s=options.timeout_s) for url in urls]
        return clients[0] if len(clients) == 1 else SandboxPool(clients)
    if options.backend == "docker":
        return await _docker_sandbox(options)
    # Any worker may get every session: no LRU eviction below max_sessions.
    return LocalSandbox(
        workers=options.workers,
        limits=options.limits,
        max_sessions_per_worker=options.max_sessions,
    )


async def _role_endpoints(
    roles: Mapping[str, ModelRole], embedded: EndpointConfig | None
) -> dict[str, EndpointConfig]:
    blocks: dict[str, EndpointConfig] = {}
    for name, role in roles.items():
        if role.block and role.block not in blocks:
            block = await load_block(LLMEndpoint, role.block, f"models.{name}.block")
            blocks[role.block] = block.endpoint(role.block)
    return {
        name: resolve_role(role, name, embedded, blocks.get(role.block or ""))
        for name, role in roles.items()
    }


@contextlib.asynccontextmanager
async def open_runtime(
    storage: StorageConfig,
    roles: Mapping[str, ModelRole],
    *,
    sandbox: SandboxOptions | None,
    row_concurrency: int,
) -> AsyncIterator[Runtime]:
    """Everything a run needs, closed (embedded model stopped, sandbox shut down) on exit.

    ``roles`` are already merged with the default role; those without a base URL share
    one embedded model, started only if needed.
    """
    from mathmill.llm.embedded import EmbeddedModel

    store = RunStore(storage)
    cache = CallCache(call_cache_path(store))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(cache.close)
        embedded: EndpointConfig | None = None
        model: EmbeddedModel | None = None
        if any(role.base_url is None and role.block is None for role in roles.values()):
            log.info("starting the embedded model (no endpoint configured)")
            model = EmbeddedModel()
            embedded = stack.enter_context(model)
        endpoints = await _role_endpoints(roles, embedded)
        pool = LLMPool(cache=cache)
        stack.push_async_callback(pool.aclose)
        await stack.enter_async_context(LiveLimits(pool, endpoints.values()))
        box: Sandbox | None = None
        if sandbox is not None:
            box = await _sandbox(sandbox)
            stack.push_async_callback(box.close)
        runtime = Runtime(
            store=store,
            pool=pool,
            endpoints=endpoints,
            sandbox=box,
            row_concurrency=row_concurrency,
        )
        try:
            yield runtime
        except MathmillError as e:
            # "cannot connect" says little when the local server crashed: say so.
            if model is not None and (why := model.died()):
                raise EmbeddedModelError(
                    f"the embedded model server died during the run ({why}); finished work "
                    "is kept, re-run to resume"
                ) from e
            raise
