"""Reading problems from a SQL database (SQLAlchemy): a table or a query, streamed with a
server-side cursor; one bad row is reported with where it was, never fatal.

The URL never holds the password: it names the environment variable that does
(``password_env``), so the password is in no parameter, cache key, log or error.

>>> SqlSource(url="sqlite:///problems.db", table="problems").label
'sql:problems'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Generator, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from datetime import date, datetime, time
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mathmill.errors import ConfigError
from mathmill.records import ErrorInfo, Problem
from mathmill.sources import FieldMap, decode_utf8, problem_from_row, read_problems

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine

__all__ = [
    "SqlSource",
    "check_sql_source",
    "read_input",
    "read_problems_sql",
    "sql_identity",
]

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"
_SYNC_DRIVERS = {"postgresql+asyncpg": "postgresql", "sqlite+aiosqlite": "sqlite"}
_POSTGRES = ("postgresql", "postgres")
_CONNECT_TIMEOUT_S = 10


class SqlSource(BaseModel):
    """A table or a query in a SQL database, and how to reach it.

    ``url`` is a SQLAlchemy URL without a password (``sqlite:///problems.db``,
    ``postgresql+psycopg://reader@db:5432/problems``); ``password_env`` names the
    environment variable holding the password. ``postgresql://`` (no driver) uses
    psycopg when psycopg2 is not installed; an async driver (``+asyncpg``,
    ``+aiosqlite``) is read with the sync one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="SQLAlchemy URL, without the password.")
    password_env: str | None = Field(
        None,
        pattern=_ENV_NAME,
        description="Name of the environment variable holding the password (never the password).",
    )
    query: str | None = Field(None, min_length=1, description="A SELECT returning the rows.")
    table: str | None = Field(
        None, pattern=_IDENTIFIER, description="A table (or schema.table) to read whole."
    )
    fetch_rows: int = Field(1000, ge=1, le=1_000_000, description="Rows per cursor fetch.")

    @field_validator("url")
    @classmethod
    def _no_password(cls, url: str) -> str:
        return cls.check_url(url)

    @staticmethod
    def check_url(url: str) -> str:
        """``url``, or a :class:`ConfigError` when it holds a password (masked)."""
        parsed = _parse(url)
        if parsed.password is not None or _secret_keys(parsed):
            raise ConfigError(
                f"sql_url {_masked(parsed)}: the URL holds a "
                "password; remove it and name the environment variable that holds it with "
                "password_env (--sql-password-env)"
            )
        return url

    @model_validator(mode="after")
    def _query_or_table(self) -> SqlSource:
        if (self.query is None) == (self.table is None):
            raise ValueError("set exactly one of query and table")
        return self

    @property
    def label(self) -> str:
        """``sql:TABLE`` or ``sql:query``: where rows say they come from."""
        return f"sql:{self.table or 'query'}"

    @property
    def masked_url(self) -> str:
        """The URL as errors show it (it holds no password; any would show as ``***``)."""
        return _masked(_parse(self.url))

    def describe(self) -> str:
        """``sql:problems at sqlite:///problems.db``: for messages."""
        return f"{self.label} at {self.masked_url}"


def read_problems_sql(
    source: SqlSource, fields: FieldMap | None = None, *, limit: int | None = None
) -> Iterator[Problem | ErrorInfo]:
    """Problems from ``source``'s rows, streamed with a server-side cursor
    (``fetch_rows`` at a time). At most ``limit`` valid problems; a bad row (no or
    non-text problem, bytes that are not UTF-8, a problem over ``MAX_ROW_BYTES``) comes
    as an :class:`ErrorInfo` naming ``sql:TABLE#rowN``. ``bytes`` are decoded as UTF-8,
    ``Decimal`` becomes a number (text when not integral), dates and times ISO text.

    Raises :class:`ConfigError` naming the URL (no password) and the database's message
    when the database cannot be reached or the query fails.
    """
    items = _limited(_items(source, fields or FieldMap()), limit)
    with closing(items):  # closing this closes the cursor at once
        for _, item in items:
            yield item


def sql_identity(
    source: SqlSource, fields: FieldMap | None = None, *, limit: int | None = None
) -> str:
    """The source's identity in the load stage's cache key: ``sql:`` and a sha256 over
    the URL (no password), the query or table and the rows as they are read, so a
    changed row changes the key.

    It reads the rows once, up to where :func:`read_problems_sql` with the same
    ``fields`` and ``limit`` stops (the rows after cannot change the load stage's
    output): all of them without a limit. A database offers nothing cheaper that is
    sound: modification counters and timestamps are per server, reset, or miss
    deletes. The rows hash in the order they come: without an ``ORDER BY`` a database
    may return them in another order, which changes the key (a cache miss, never a
    wrong hit).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([source.masked_url, source.query, source.table]).encode())
    items = _limited(_items(source, fields or FieldMap()), limit)
    with closing(items):
        for raw, _ in items:
            digest.update(_canonical(raw))
    return f"sql:{digest.hexdigest()}"


def check_sql_source(source: SqlSource, fields: FieldMap | None = None) -> None:
    """Fail now, with a :class:`ConfigError` naming the URL (no password) and why, when
    the source cannot be read: the database is unreachable, the password variable is
    unset, the query fails, or its rows have no problem column. Fetches one row.
    """
    fields = fields or FieldMap()
    with _connection(source) as conn:
        try:
            result = conn.execution_options(stream_results=True).execute(_statement(source))
            columns = list(result.keys())
            result.fetchmany(1)
            result.close()
        except Exception as e:
            raise _error(source, e) from None
    if fields.statement not in columns:
        raise ConfigError(
            f"{source.describe()}: no column {fields.statement!r} for the problem text "
            f"(columns: {', '.join(columns)}); set prompt_field"
        )


def read_input(
    input: str,
    sql: SqlSource | None,
    fields: FieldMap,
    *,
    split: str = "test",
    limit: int | None = None,
) -> Iterator[Problem | ErrorInfo]:
    """Problems from ``sql`` when set, else from the file, directory or dataset
    ``input`` (:func:`mathmill.sources.read_problems`).
    """
    if sql is not None:
        return read_problems_sql(sql, fields, limit=limit)
    return read_problems(input, fields, split=split, limit=limit)


# -- rows -----------------------------------------------------------------------------------


def _limited(
    items: Generator[tuple[dict[str, Any], Problem | ErrorInfo]], limit: int | None
) -> Generator[tuple[dict[str, Any], Problem | ErrorInfo]]:
    """``items`` until ``limit`` valid problems went by (as :func:`read_problems`); then
    ``items`` is closed at once, and its cursor and connection with it.
    """
    valid = 0
    with closing(items):
        for raw, item in items:
            if limit is not None and valid >= limit:
                return
            valid += isinstance(item, Problem)
            yield raw, item


def _items(
    source: SqlSource, fields: FieldMap
) -> Generator[tuple[dict[str, Any], Problem | ErrorInfo]]:
    """Each row as it came (for hashing) and what it makes: a problem or an error."""
    for index, raw in enumerate(_rows(source), 1):
        where = f"{source.label}#row{index}"
        row = _decoded(raw, where)
        item = (
            row
            if isinstance(row, ErrorInfo)
            else problem_from_row(row, fields, where, source.label)
        )
        yield raw, item


def _rows(source: SqlSource) -> Generator[dict[str, Any]]:
    """The rows, ``fetch_rows`` at a time through a server-side cursor."""
    with _connection(source) as conn:
        streaming = conn.execution_options(stream_results=True, yield_per=source.fetch_rows)
        try:
            result = streaming.execute(_statement(source))
            columns = list(result.keys())
            for row in result:
                yield dict(zip(columns, row, strict=True))
        except Exception as e:
            raise _error(source, e) from None


def _decoded(raw: Mapping[str, Any], where: str) -> dict[str, Any] | ErrorInfo:
    """The row's values as the sources know them: text, numbers, ISO dates; or the error
    naming the column that holds bytes that are not UTF-8.
    """
    row: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, memoryview | bytearray):
            value = bytes(value)
        if isinstance(value, bytes):
            value = decode_utf8(value, where, f"column {name!r} is ")
            if isinstance(value, ErrorInfo):
                return value
        row[name] = _plain(value)
    return row


def _plain(value: Any) -> Any:
    """A database value as JSON would hold it (bytes are decoded before)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        if value == value.to_integral_value():
            return int(value)
        return format(value.normalize(), "f")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def _canonical(raw: Mapping[str, Any]) -> bytes:
    """A row's bytes for the identity hash: names, types and values, unambiguous."""

    def encode(value: Any) -> Any:
        if isinstance(value, memoryview | bytearray | bytes):
            return {"bytes": bytes(value).hex()}
        if isinstance(value, str | int | float | bool) or value is None:
            return value
        return {type(value).__name__: str(value)}

    return json.dumps([[k, encode(v)] for k, v in raw.items()]).encode() + b"\n"


# -- the database ---------------------------------------------------------------------------


def _parse(url: str) -> URL:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        raise ValueError(
            "not a SQLAlchemy URL (dialect+driver://user@host:port/database, sqlite:///FILE)"
        ) from None


def _secret_keys(url: URL) -> list[str]:
    """The URL's query keys that hold secrets (``password``, ``sslpassword``, tokens)."""
    return [k for k in url.query if any(w in k.lower() for w in ("password", "secret", "token"))]


def _masked(url: URL) -> str:
    """The URL with ``***`` for a password, in its user part or its query."""
    if secret := _secret_keys(url):
        url = url.update_query_dict(dict.fromkeys(secret, "***"))
    return url.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def _engine_url(source: SqlSource) -> URL:
    """The URL to connect with: a sync driver, and the password from its variable."""
    url = _parse(source.url)
    driver = url.drivername
    driver = _SYNC_DRIVERS.get(driver, driver)
    if driver in _POSTGRES:
        driver = "postgresql"
        if importlib.util.find_spec("psycopg2") is None:
            driver = "postgresql+psycopg"
    url = url.set(drivername=driver)
    if source.password_env:
        password = os.environ.get(source.password_env)
        if not password:
            raise ConfigError(
                f"{source.describe()}: environment variable {source.password_env} "
                "(password_env) is unset"
            )
        url = url.set(password=password)
    return url


def _create_engine(source: SqlSource) -> Engine:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    url = _engine_url(source)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = _CONNECT_TIMEOUT_S
    try:
        return create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except ImportError as e:
        raise ConfigError(
            f"{source.describe()}: the database driver is not installed ({e.name}); for "
            "PostgreSQL: pip install 'mathmill[postgres]'"
        ) from None
    except Exception as e:
        raise _error(source, e) from None


@contextmanager
def _connection(source: SqlSource) -> Generator[Connection]:
    """A connection to the source's database, closed with its engine on exit."""
    engine = _create_engine(source)
    try:
        try:
            conn = engine.connect()
        except Exception as e:
            raise _error(source, e) from None
        try:
            yield conn
        finally:
            with suppress(Exception):  # a read-only session: a failed close loses nothing
                conn.close()
    finally:
        engine.dispose()


def _statement(source: SqlSource) -> Any:
    """The SELECT: the table quoted by SQLAlchemy, or the query as written (its colons
    are not bind parameters).
    """
    from sqlalchemy import literal_column, select, table, text

    if source.table is not None:
        schema, _, name = source.table.rpartition(".")
        return select(literal_column("*")).select_from(table(name, schema=schema or None))
    query = (source.query or "").strip().rstrip(";").strip()
    return text(query.replace(":", "\\:"))


def _error(source: SqlSource, error: BaseException) -> ConfigError:
    """One line: the source, its URL (no password) and the database's message."""
    orig = getattr(error, "orig", None)
    message = " ".join(str(orig if orig is not None else error).split())
    message = re.sub(r"\(Background on this error at: [^)]*\)", "", message).strip()
    if source.password_env and (password := os.environ.get(source.password_env)):
        message = message.replace(password, "***")
    return ConfigError(f"cannot read {source.describe()}: {message}")
