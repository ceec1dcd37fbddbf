"""The database of ``mathmill server up``: the SQLite file in the server's home (the
default) or PostgreSQL (``--database`` / ``$MATHMILL_SERVER_DATABASE``). URLs are parsed
into a :class:`Database` whose URL and password are secrets; every message about it
shows the URL masked and names the host; a PostgreSQL database is checked with one
connection before the server starts.

Apart from :mod:`mathmill.local_server` so that ``mathmill --help`` does not import pydantic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
from collections.abc import Coroutine
from typing import Any, Literal
from urllib.parse import quote, quote_plus

from pydantic import BaseModel, ConfigDict, SecretStr

from mathmill.errors import ConfigError
from mathmill.local_server import ServerError, ServerHome

__all__ = [
    "DATABASE_ENV",
    "FORMS",
    "Database",
    "mask_url",
    "parse_database",
    "resolve_database",
]

DATABASE_ENV = "MATHMILL_SERVER_DATABASE"
FORMS = "postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE or sqlite+aiosqlite:///PATH"
_USERINFO = re.compile(r"(://[^/@:\s]*:)[^@\s]*@")
_SSL_MODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


def mask_url(text: str, secret: str | None = None) -> str:
    """``text`` with the password of every URL in it (``scheme://user:password@``), and
    ``secret`` wherever it appears (as is or percent-encoded), replaced by ``***``.

    >>> mask_url("postgresql+asyncpg://mm:s3cret@db:5432/prefect")
    'postgresql+asyncpg://mm:***@db:5432/prefect'
    """
    if secret:
        for form in sorted({secret, quote_plus(secret), quote(secret, safe="")}, key=len)[::-1]:
            text = text.replace(form, "***")
    return _USERINFO.sub(r"\1***@", text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Database(BaseModel):
    """The server's database: the SQLite file in its home (the default) or PostgreSQL.
    The URL and password are secrets; messages use :attr:`masked` and :attr:`where`.

    >>> db = parse_database("postgresql+asyncpg://mm:s3cret@db.internal:5433/prefect")
    >>> db.masked, db.where
    ('postgresql+asyncpg://mm:***@db.internal:5433/prefect', 'db.internal:5433/prefect')
    >>> "s3cret" in repr(db)
    False
    """

    model_config = ConfigDict(frozen=True)

    url: SecretStr
    kind: Literal["sqlite", "postgresql"]
    host: str | None = None
    port: int | None = None
    name: str = ""
    user: str | None = None
    password: SecretStr | None = None
    ssl: str | None = None

    def mask(self, text: str) -> str:
        """``text`` without this database's password."""
        return mask_url(text, self.password.get_secret_value() if self.password else None)

    @property
    def masked(self) -> str:
        """The URL with its password replaced by ``***``."""
        return self.mask(self.url.get_secret_value())

    @property
    def where(self) -> str:
        """``host:port/database`` (PostgreSQL) or the file (SQLite): no credentials."""
        if self.kind == "sqlite":
            return self.name
        return f"{self.host}:{self.port or 5432}/{self.name}"

    def check(self, timeout_s: float = 10.0) -> None:
        """Connect once (PostgreSQL): raise a one-line :class:`ServerError` naming the
        host, never the password, when the server cannot be reached or refuses.
        """
        if self.kind == "sqlite":
            return
        _run_sync(_probe(self, timeout_s))


def parse_database(value: str) -> Database:
    """The :class:`Database` of a URL: ``postgresql+asyncpg://user:password@host:port/db``
    (``postgresql://`` and ``postgres://`` mean the same) or ``sqlite+aiosqlite:///path``.
    """
    from urllib.parse import parse_qs, unquote, urlsplit

    raw = value.strip()
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower()
    if not sep or not scheme:
        raise ServerError(f"the database is not a URL (no scheme://): expected {FORMS}")
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        path = rest[1:] if rest.startswith("/") else ""
        if not path:
            raise ServerError(f"the SQLite database URL names no file: expected {FORMS}")
        return Database(url=SecretStr(f"sqlite+aiosqlite://{rest}"), kind="sqlite", name=path)
    if scheme not in ("postgresql+asyncpg", "postgresql", "postgres"):
        raise ServerError(
            f"unsupported database {scheme}://: Prefect's server needs an async driver, {FORMS}"
        )
    parts = urlsplit(f"postgresql://{rest}")
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        raise ServerError(f"the database URL's port is not a number (host {host})") from None
    name = unquote(parts.path.lstrip("/"))
    if not host:
        raise ServerError(f"the PostgreSQL URL names no host: expected {FORMS}")
    if not name:
        raise ServerError(f"the PostgreSQL URL names no database (host {host}): expected {FORMS}")
    query = parse_qs(parts.query)
    ssl = next(iter(query.get("ssl") or query.get("sslmode") or []), None)
    return Database(
        url=SecretStr(f"postgresql+asyncpg://{rest}"),
        kind="postgresql",
        host=host,
        port=port,
        name=name,
        user=unquote(parts.username) if parts.username else None,
        password=SecretStr(unquote(parts.password)) if parts.password else None,
        ssl=ssl if ssl in _SSL_MODES else None,
    )


def resolve_database(value: str | SecretStr | None, home: ServerHome) -> Database:
    """The database of a server started from ``home``: ``value``, else
    ``$MATHMILL_SERVER_DATABASE``, else the SQLite file in ``home`` (also for ``sqlite``).
    """
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    raw = (value or os.environ.get(DATABASE_ENV) or "").strip()
    if raw.lower() in ("", "sqlite"):
        url = f"sqlite+aiosqlite:///{home.database}"
        return Database(url=SecretStr(url), kind="sqlite", name=str(home.database))
    return parse_database(raw)


async def _probe(db: Database, timeout_s: float) -> None:
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "a PostgreSQL database needs asyncpg: pip install 'mathmill[postgres]'"
        ) from None
    at = f"{db.host}:{db.port or 5432}"
    try:
        conn = await asyncpg.connect(
            host=db.host,
            port=db.port or 5432,
            user=db.user,
            password=db.password.get_secret_value() if db.password else None,
            database=db.name,
            timeout=timeout_s,
            ssl=db.ssl,
        )
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
        return
    except asyncpg.InvalidPasswordError:
        message = f"PostgreSQL at {at} refused user {db.user!r}: password authentication failed"
    except asyncpg.InvalidCatalogNameError:
        message = (
            f"PostgreSQL at {at} has no database {db.name!r}: create it first "
            f"(createdb -h {db.host} -p {db.port or 5432} -U {db.user or 'USER'} {db.name})"
        )
    except asyncpg.PostgresError as e:
        message = f"PostgreSQL at {at}/{db.name} refused the connection: {e}"
    except (OSError, TimeoutError) as e:
        reason = str(e) or f"no answer within {timeout_s:.0f}s"
        message = f"cannot reach PostgreSQL at {at} ({type(e).__name__}: {reason})"
    except Exception as e:  # asyncpg's interface errors (SSL, protocol)
        message = f"cannot connect to PostgreSQL at {at}: {type(e).__name__}: {e}"
    raise ServerError(db.mask(_one_line(message)))


def _run_sync(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end from sync code, inside a running event loop or not."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()
