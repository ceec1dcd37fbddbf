"""``python -m mathmill.prefect_server server start ...``: Prefect's own CLI; on SQLite,
the server's write transactions take turns in the server process instead of failing
on each other.

Why: SQLite has one writer. Prefect opens most transactions *deferred*: they read,
then upgrade to a write. When another connection wrote in between, SQLite fails the
upgrade at once (``database is locked``; its busy timeout does not apply to that case),
Prefect rolls back and answers 503, and its client retries after 2, 4, 8, 16, 32 s and
then gives up. Measured with `mathmill server up` on 2 cores: 20 concurrent
``create_flow_run_from_deployment`` requests, sent once each, got 19 answers 503 (16 of
20 at 4 at a time); through Prefect's client they took 7 s (p50) to 75 s (p99), and 2 of
20 failed after the last retry while 20 runs were going. With the transactions taking
turns the same 20 requests all succeed at once (201) in about 1.4 s, as on PostgreSQL.

How: each event loop of the server has one lock; a transaction that Prefect begins
(``begin_transaction``) waits for it, so one runs at a time in that loop, as SQLite would
have them anyway, and nothing changes in what a transaction does. A transaction begun
inside another (same task) does not wait (it would wait for itself); nor does one that
waited ``LOCK_WAIT_S``, which then goes on as it would without this, so nothing waits
forever. Writes by other processes (or loops) still meet Prefect's usual busy handling.
``MATHMILL_SQLITE_TURNS=0`` turns this off; PostgreSQL servers run Prefect unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import weakref
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

__all__ = ["LOCK_WAIT_S", "install", "main", "transaction_turns"]

LOCK_WAIT_S = 30.0
log = logging.getLogger("mathmill.prefect_server")
_inside: ContextVar[bool] = ContextVar("mathmill_sqlite_transaction", default=False)
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


class _Stats:
    """How many transactions waited their turn, and gave up waiting (tests, logs)."""

    waited = 0
    gave_up = 0


stats = _Stats()


def _loop_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _locks.get(loop)
    if lock is None:
        lock = _locks[loop] = asyncio.Lock()
    return lock


@contextlib.asynccontextmanager
async def transaction_turns(wait_s: float = LOCK_WAIT_S) -> AsyncIterator[None]:
    """Wait for this loop's turn (unless already inside a transaction); hold it."""
    if _inside.get():
        yield
        return
    lock = _loop_lock()
    if lock.locked():
        stats.waited += 1
    acquired = False
    try:
        async with asyncio.timeout(wait_s):
            acquired = await lock.acquire()
    except TimeoutError:
        stats.gave_up += 1
        log.warning("a transaction waited %.3gs for its turn; it goes on without", wait_s)
    token = _inside.set(True)  # given up or not: transactions inside it do not wait
    try:
        yield
    finally:
        _inside.reset(token)
        if acquired:
            lock.release()


def _on_sqlite() -> bool:
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    return url is None or url.get_secret_value().startswith("sqlite")


def install() -> bool:
    """Make the SQLite configuration's transactions take turns; whether it did (not on
    PostgreSQL, nor with ``MATHMILL_SQLITE_TURNS=0``).
    """
    if os.environ.get("MATHMILL_SQLITE_TURNS", "1") == "0" or not _on_sqlite():
        return False
    from prefect.server.database.configurations import AioSqliteConfiguration

    begin = AioSqliteConfiguration.begin_transaction
    if getattr(begin, "_mathmill_turns", False):
        return True

    @contextlib.asynccontextmanager
    async def begin_transaction(
        self: AioSqliteConfiguration, session: Any, with_for_update: bool = False
    ) -> AsyncIterator[Any]:
        async with transaction_turns(), begin(self, session, with_for_update) as transaction:
            yield transaction

    begin_transaction._mathmill_turns = True  # type: ignore[attr-defined]
    AioSqliteConfiguration.begin_transaction = begin_transaction  # type: ignore[method-assign]
    return True


def main() -> None:
    """Run Prefect's CLI (``prefect ...`` arguments) with :func:`install` applied."""
    install()
    from prefect.cli import app

    sys.argv = ["prefect", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
