"""Live concurrency: an endpoint's requests in flight follow a Prefect global
concurrency limit, re-read while the run goes on.

An endpoint with ``concurrency_limit="llm-openrouter"`` gets its in-flight cap from
the Prefect global concurrency limit of that name. The limit is created (with the
endpoint's ``max_concurrency``) when it does not exist, so it shows in the UI under
*Concurrency*; changing it there, or with
``prefect global-concurrency-limit update llm-openrouter --limit 32``, takes effect
in every running flow within ``poll_s`` seconds. An inactive limit means "back to the
endpoint's ``max_concurrency``"; a limit of 0 pauses new requests to the endpoint.

The limit caps the requests in flight *of each flow run* that uses the endpoint; the
slots are not taken one request at a time from the server (that would cost two API
calls per LLM request and wait on Prefect's retry intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from mathmill.llm.client import LLMClient, LLMPool
from mathmill.llm.config import EndpointConfig

__all__ = ["LiveLimits", "create_limit", "ensure_limit", "poll_interval"]

log = logging.getLogger("mathmill.llm.live")


def poll_interval() -> float:
    """Seconds between reads of the limits: ``$MATHMILL_LIVE_POLL_S``, default 2."""
    try:
        return max(0.05, float(os.environ.get("MATHMILL_LIVE_POLL_S", "2")))
    except ValueError:
        return 2.0


class LiveLimits:
    """Keeps the clients of ``endpoints`` at their global concurrency limits while open.

    Nothing happens for endpoints without ``concurrency_limit``. When the Prefect API
    cannot be reached, the clients keep their last capacity and a warning is logged
    once per outage.
    """

    def __init__(
        self, pool: LLMPool, endpoints: Iterable[EndpointConfig], poll_s: float | None = None
    ) -> None:
        self.poll_s = poll_interval() if poll_s is None else poll_s
        self._watched: dict[str, tuple[EndpointConfig, list[LLMClient]]] = {}
        for endpoint in endpoints:
            if endpoint.concurrency_limit:
                _, clients = self._watched.setdefault(endpoint.concurrency_limit, (endpoint, []))
                client = pool.client(endpoint)
                if client not in clients:
                    clients.append(client)
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.changes: list[tuple[str, int]] = []  # (limit name, new capacity), for tests

    async def __aenter__(self) -> LiveLimits:
        if self._watched:
            await self.refresh(create=True)
            self._task = asyncio.create_task(self._loop(), name="mathmill-live-limits")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()

    async def refresh(self, *, create: bool = False) -> None:
        """Read every watched limit once and apply it (creating missing ones if asked)."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            async with get_client() as client:
                for name, (endpoint, clients) in self._watched.items():
                    try:
                        limit = await client.read_global_concurrency_limit_by_name(name)
                    except ObjectNotFound:
                        if not create:
                            continue  # deleted mid-run: keep the last capacity
                        await create_limit(client, name, endpoint.max_concurrency)
                        log.info(
                            "created global concurrency limit %r = %d for %s",
                            name,
                            endpoint.max_concurrency,
                            endpoint.label,
                        )
                        continue
                    wanted = limit.limit if limit.active else endpoint.max_concurrency
                    self._apply(name, endpoint, clients, wanted)
        except Exception as e:  # an unreachable API must not stop the run
            if not self._failing:
                log.warning(
                    "cannot read global concurrency limits (%s); keeping them as they are", e
                )
            self._failing = True
            return
        self._failing = False

    def _apply(
        self, name: str, endpoint: EndpointConfig, clients: list[LLMClient], wanted: int
    ) -> None:
        for client in clients:
            if client.limiter.capacity != wanted:
                log.info(
                    "%s: %d requests in flight at most (was %d; global concurrency limit %r)",
                    endpoint.label,
                    wanted,
                    client.limiter.capacity,
                    name,
                )
                client.set_concurrency(wanted)
                self.changes.append((name, wanted))


async def create_limit(client: Any, name: str, limit: int) -> None:
    """Create the global concurrency limit ``name`` unless it exists (``client``: a
    Prefect client). `mathmill blocks llm` makes it when the block is saved, so that
    runs starting together do not all try to (Prefect's server answers the losers of
    that race with an error, not 409).
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with contextlib.suppress(ObjectAlreadyExists):
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit)
        )


async def ensure_limit(name: str, limit: int) -> bool:
    """Create the global concurrency limit ``name`` with ``limit`` unless it exists;
    whether it was created.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            await create_limit(client, name, limit)
            return True
