"""The local server's database: URLs (PostgreSQL or the SQLite file), passwords kept
out of every message, one-line errors naming the host; and the SQLite transactions
taking turns in the server process (mathmill.prefect_server).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mathmill.local_server import ServerError, ServerHome, server_env
from mathmill.local_server_database import (
    DATABASE_ENV,
    Database,
    mask_url,
    parse_database,
    resolve_database,
)
from tests.deploy_support import MATHMILL, free_port

SECRET = "pa:ss/w@rd%-42"  # as it is, and percent-encoded in the URL
URL = "postgresql+asyncpg://mm:pa%3Ass%2Fw%40rd%25-42@db.internal:5433/prefect"


def test_a_postgres_url_is_parsed_and_its_password_kept_secret() -> None:
    db = parse_database(URL)
    assert (db.kind, db.host, db.port, db.name, db.user) == (
        "postgresql",
        "db.internal",
        5433,
        "prefect",
        "mm",
    )
    assert db.password is not None and db.password.get_secret_value() == SECRET
    assert db.masked == "postgresql+asyncpg://mm:***@db.internal:5433/prefect"
    assert db.where == "db.internal:5433/prefect"
    for text in (repr(db), str(db), db.masked, db.model_dump_json()):
        assert SECRET not in text and "pa%3Ass" not in text, text
    assert db.mask(f"failed: {URL} and {SECRET}") == (
        "failed: postgresql+asyncpg://mm:***@db.internal:5433/prefect and ***"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
        ("postgres://u:p@h:1/d?ssl=require", "postgresql+asyncpg://u:p@h:1/d?ssl=require"),
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
        ("sqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
    ],
)
def test_the_url_forms_prefect_takes(url: str, expected: str) -> None:
    assert parse_database(url).url.get_secret_value() == expected


def test_ssl_query_is_kept_for_the_check() -> None:
    assert parse_database("postgresql://u:p@h/d?sslmode=require").ssl == "require"
    assert parse_database("postgresql://u:p@h/d").ssl is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mm:hunter2@db/prefect", "not a URL"),
        ("mysql://mm:hunter2@db/prefect", "unsupported database mysql://"),
        ("postgresql+psycopg2://mm:hunter2@db/prefect", "needs an async driver"),
        ("postgresql://mm:hunter2@db:port/prefect", "port is not a number (host db)"),
        ("postgresql://mm:hunter2@db:5432/", "names no database (host db)"),
        ("postgresql://mm:hunter2@/prefect", "names no host"),
        ("sqlite+aiosqlite://", "names no file"),
    ],
)
def test_bad_urls_are_one_line_errors_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ServerError, match=re.escape(message)) as raised:
        parse_database(url)
    text = str(raised.value)
    assert "hunter2" not in text and "\n" not in text


def test_the_default_is_the_sqlite_file_unless_the_variable_names_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = ServerHome(tmp_path)
    monkeypatch.delenv(DATABASE_ENV, raising=False)
    db = resolve_database(None, home)
    assert db.kind == "sqlite" and db.masked == f"sqlite+aiosqlite:///{tmp_path}/prefect.db"
    monkeypatch.setenv(DATABASE_ENV, URL)
    assert resolve_database(None, home).where == "db.internal:5433/prefect"
    assert resolve_database("sqlite", home).kind == "sqlite"  # the option wins
    assert resolve_database("postgresql://u:p@h/other", home).name == "other"


def test_the_server_gets_the_url_and_nothing_else_changes(tmp_path: Path) -> None:
    db = parse_database(URL)
    base = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///elsewhere.db"}
    env = server_env(ServerHome(tmp_path), "http://127.0.0.1:1/api", base, database=db)
    # the newer name would win over the older one: only ours is left
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in env
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == db.url.get_secret_value()
    assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "500"


def test_mask_url_hides_every_password_in_a_text() -> None:
    text = "a postgresql://a:one@h/d b postgres://b:two@h2/d2 c sqlite:///x.db"
    assert mask_url(text) == "a postgresql://a:***@h/d b postgres://b:***@h2/d2 c sqlite:///x.db"
    assert mask_url("token=abc", "abc") == "token=***"


def test_an_unreachable_postgres_is_one_line_naming_the_host(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    db = parse_database(f"postgresql+asyncpg://mm:hunter2@127.0.0.1:{port}/prefect")
    with pytest.raises(ServerError, match=f"cannot reach PostgreSQL at 127.0.0.1:{port}") as e:
        db.check(timeout_s=5)
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)


async def test_the_check_works_inside_a_running_event_loop() -> None:
    db = parse_database(f"postgresql://mm:hunter2@127.0.0.1:{free_port()}/prefect")
    with pytest.raises(ServerError, match="cannot reach PostgreSQL"):
        db.check(timeout_s=5)


def _up(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run(
        [MATHMILL, "server", "up", "--port", str(free_port()), *args],
        env=env | env_extra,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_server_up_refuses_a_bad_database_before_starting_anything(tmp_path: Path) -> None:
    port = free_port()
    home = ["--home", str(tmp_path / "home")]
    url = f"postgresql+asyncpg://mm:hunter2@127.0.0.1:{port}/prefect"
    done = _up({}, *home, "--database", url)
    assert done.returncode == 1, done
    out = done.stdout + done.stderr
    assert f"error: cannot reach PostgreSQL at 127.0.0.1:{port}" in out, out
    assert "hunter2" not in out
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "mm:***@" in done.stdout  # what it was about to start, masked
    assert not (tmp_path / "home" / "server.pid").exists()
    # the variable, with a URL that does not parse
    done = _up({DATABASE_ENV: "postgresql://mm:hunter2@db:port/x"}, *home)
    assert done.returncode == 1 and "hunter2" not in done.stdout + done.stderr
    assert "error: the database URL's port is not a number (host db)" in done.stderr


# -- SQLite transactions taking turns in the server process ---------------------------


async def test_transactions_take_turns_and_nested_ones_do_not_wait() -> None:
    from mathmill.prefect_server import transaction_turns

    inside, most = 0, 0

    async def transaction() -> None:
        nonlocal inside, most
        async with transaction_turns():
            inside += 1
            most = max(most, inside)
            async with transaction_turns():  # begun inside: it must not wait for itself
                await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(transaction() for _ in range(10))), 30)
    assert most == 1


async def test_a_transaction_that_waited_too_long_goes_on() -> None:
    from mathmill.prefect_server import stats, transaction_turns

    release = asyncio.Event()

    async def holder() -> None:
        async with transaction_turns():
            await release.wait()

    task = asyncio.create_task(holder())
    await asyncio.sleep(0.01)
    gave_up = stats.gave_up
    async with transaction_turns(wait_s=0.05):
        pass
    assert stats.gave_up == gave_up + 1
    release.set()
    await task
    async with transaction_turns(wait_s=1):  # the turn is free again
        pass


def test_install_only_on_sqlite_and_unless_turned_off() -> None:
    code = (
        "import mathmill.prefect_server as p; "
        "from prefect.server.database.configurations import AioSqliteConfiguration as A; "
        "print(p.install(), getattr(A.begin_transaction, '_mathmill_turns', False))"
    )

    def run(env: dict[str, str]) -> str:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MATHMILL"))}
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=base | env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout.strip()

    sqlite = {"PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:////tmp/x.db"}
    assert run(sqlite) == "True True"
    assert run(sqlite | {"MATHMILL_SQLITE_TURNS": "0"}) == "False False"
    assert run({"PREFECT_API_DATABASE_CONNECTION_URL": URL}) == "False False"


def test_database_model_fields_are_secret() -> None:
    assert Database.model_fields["url"].annotation.__name__ == "SecretStr"  # type: ignore[union-attr]
