"""Problems read from SQL databases (mathmill.sources_sql): SQLite and a real PostgreSQL
(tests/postgres_support) give the same problems as the JSONL file their table was
filled from; bad rows are errors naming the row while the good ones go on; the
password is never in a URL, an error or a dropped row; PostgreSQL streams through a
server-side cursor. Also the flows' options, the load stage and the CLI on SQL inputs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import URL

from mathmill import cli as mathmill_cli
from mathmill.errors import ConfigError
from mathmill.flows.options import InputFields
from mathmill.records import ErrorInfo, Problem
from mathmill.sources import MAX_ROW_BYTES, FieldMap, read_problems_jsonl
from mathmill.sources_sql import (
    SqlSource,
    check_sql_source,
    read_problems_sql,
    sql_identity,
)
from mathmill.tasks.load import LoadConfig, load
from tests.postgres_support import Postgres, postgres  # noqa: F401  (a session fixture)

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT / "tests" / "data" / "gsm8k_test.jsonl"
ROWS = 60
DOMAINS = ("Algebra", "geometry", "ARITHMETIC")
PASSWORD_ENV = "MATHMILL_TEST_SQL_PASSWORD"


# -- the data: a slice of GSM8K with a domain and a level, as JSONL and as tables -------------


def _slice() -> list[dict[str, Any]]:
    rows = []
    with GSM8K.open(encoding="utf-8") as f:
        for i, line in enumerate(islice(f, ROWS)):
            row = json.loads(line)
            rows.append({**row, "domain": DOMAINS[i % 3], "level": i % 5})
    return rows


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The JSONL file the tables are filled from, and its rows."""
    rows = _slice()
    path = tmp_path_factory.mktemp("sql") / "gsm8k_slice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def _problems_table(name: str, metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        *(sa.Column(c, sa.Text) for c in ("id", "problem", "answer", "solution", "source")),
        sa.Column("license", sa.Text),
        sa.Column("domain", sa.Text),
        sa.Column("level", sa.Integer),
    )


def fill(url: str | URL, rows: list[dict[str, Any]], name: str = "problems") -> None:
    """Create table ``name`` (the slice's columns, in its order) and insert ``rows``."""
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = _problems_table(name, metadata)
    with engine.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        conn.execute(table.insert(), rows)
    engine.dispose()


def fill_bad(url: str | URL, on_postgres: bool) -> None:
    """Table ``bad``: good rows among a NULL problem, an oversized one, bytes that are
    not UTF-8 and an integer (on PostgreSQL: bytes in column ``data``, integers in
    ``num``; on SQLite all in ``problem``, a column with no type).
    """
    engine = sa.create_engine(url)
    huge = "x" * (MAX_ROW_BYTES + 10)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS bad")
        if on_postgres:
            conn.exec_driver_sql(
                "CREATE TABLE bad (n integer, id text, problem text, data bytea, num integer)"
            )
            rows: list[dict[str, Any]] = [
                {"n": 1, "id": "g1", "problem": "What is 2+2?", "data": b"Two plus two?", "num": 1},
                {"n": 2, "id": "null", "problem": None, "data": None, "num": 2},
                {"n": 3, "id": "huge", "problem": huge, "data": None, "num": 3},
                {"n": 4, "id": "g2", "problem": "What is 3+3?", "data": b"caf\xc3\xa9?", "num": 4},
                {"n": 5, "id": "bytes", "problem": "What is 5+5?", "data": b"\xff oops", "num": 5},
            ]
            statement = "INSERT INTO bad VALUES (:n, :id, :problem, :data, :num)"
        else:  # a column with no type holds anything
            conn.exec_driver_sql("CREATE TABLE bad (n integer, id text, problem)")
            rows = [
                {"n": 1, "id": "g1", "problem": "What is 2+2?"},
                {"n": 2, "id": "null", "problem": None},
                {"n": 3, "id": "int", "problem": 7},
                {"n": 4, "id": "bytes", "problem": b"\xff\xfe oops"},
                {"n": 5, "id": "huge", "problem": huge},
                {"n": 6, "id": "g2", "problem": "What is 3+3?"},
            ]
            statement = "INSERT INTO bad VALUES (:n, :id, :problem)"
        conn.execute(sa.text(statement), rows)
    engine.dispose()


@pytest.fixture(scope="module")
def sqlite_url(
    tmp_path_factory: pytest.TempPathFactory, filled: tuple[Path, list[dict[str, Any]]]
) -> str:
    """A SQLite file holding ``problems`` (the slice) and ``bad``."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'problems.db'}"
    fill(url, filled[1])
    fill_bad(url, on_postgres=False)
    return url


@pytest.fixture(scope="module")
def pg(postgres: Postgres, filled: tuple[Path, list[dict[str, Any]]]) -> Postgres:  # noqa: F811
    """The test server with database ``sources``: ``problems``, ``Mixed_Case``, ``bad``."""
    postgres.create_database("sources")
    admin = _admin_url(postgres)
    fill(admin, filled[1])
    fill(admin, filled[1][:5], name="Mixed_Case")
    fill_bad(admin, on_postgres=True)
    return postgres


def _admin_url(pg: Postgres, **query: str) -> URL:
    """The test's own URL, password included (never given to mathmill)."""
    return URL.create(
        "postgresql+psycopg",
        username=pg.user,
        password=pg.password,
        host=pg.host,
        port=pg.port,
        database="sources",
        query=query,
    )


def pg_url(pg: Postgres, driver: str = "postgresql+psycopg", query: str = "") -> str:
    """mathmill's URL for the test server: no password in it."""
    return f"{driver}://{pg.user}@{pg.host}:{pg.port}/sources{query}"


@pytest.fixture
def password(pg: Postgres, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server's password, in :data:`PASSWORD_ENV` for this test."""
    monkeypatch.setenv(PASSWORD_ENV, pg.password)
    return pg.password


def same(problems: list[Problem | ErrorInfo]) -> list[dict[str, Any]]:
    """Problems as compared across sources (everything but when they were read)."""
    out = []
    for p in problems:
        assert isinstance(p, Problem), p
        out.append(p.model_dump(mode="json", exclude={"created_at"}))
    return out


# -- the same rows from SQLite, PostgreSQL and the JSONL ----------------------------------


def test_sqlite_postgres_and_jsonl_give_the_same_problems(
    filled: tuple[Path, list[dict[str, Any]]], sqlite_url: str, pg: Postgres, password: str
) -> None:
    path, rows = filled
    from_jsonl = same(list(read_problems_jsonl(path)))
    from_sqlite = same(list(read_problems_sql(SqlSource(url=sqlite_url, table="problems"))))
    source = SqlSource(url=pg_url(pg), password_env=PASSWORD_ENV, table="problems", fetch_rows=7)
    from_pg = same(list(read_problems_sql(source)))
    assert len(from_jsonl) == ROWS
    assert from_sqlite == from_pg == from_jsonl
    first = from_pg[0]
    assert (first["source_id"], first["answer"]) == (rows[0]["id"], rows[0]["answer"])
    assert first["statement"] == rows[0]["problem"]
    assert first["solution"] == rows[0]["solution"]
    assert (first["source"], first["license"]) == (rows[0]["source"], rows[0]["license"])
    assert first["metadata"] == {"domain": "Algebra", "level": 0}
    # a mixed-case table is quoted by SQLAlchemy, and a URL with no driver works
    mixed = SqlSource(url=pg_url(pg, "postgresql"), password_env=PASSWORD_ENV, table="Mixed_Case")
    assert same(list(read_problems_sql(mixed))) == from_jsonl[:5]


def test_a_query_with_a_where_on_both_databases(
    filled: tuple[Path, list[dict[str, Any]]], sqlite_url: str, pg: Postgres, password: str
) -> None:
    path, _ = filled
    # colons and percent signs are the query's own, not parameters
    query = (
        "SELECT * FROM problems WHERE level = 3 AND problem LIKE '%a%' "
        "AND 'x:y' = 'x:y' ORDER BY id;"
    )
    wanted = sorted(
        (p for p in same(list(read_problems_jsonl(path))) if p["metadata"]["level"] == 3),
        key=lambda p: p["source_id"],
    )
    wanted = [p for p in wanted if "a" in p["statement"]]
    assert 0 < len(wanted) < ROWS // 5 + 1
    lite = same(list(read_problems_sql(SqlSource(url=sqlite_url, query=query))))
    source = SqlSource(url=pg_url(pg), password_env=PASSWORD_ENV, query=query)
    post = same(list(read_problems_sql(source)))
    for got in (lite, post):
        assert [{**p, "source": None} for p in got] == [{**p, "source": None} for p in wanted]
    cast_query = "SELECT id::text AS id, problem, answer FROM problems WHERE level::int = 3"
    source = SqlSource(url=pg_url(pg), password_env=PASSWORD_ENV, query=cast_query)
    assert len(list(read_problems_sql(source))) == ROWS // 5


def test_limit_and_fetch_rows_on_sqlite(sqlite_url: str) -> None:
    source = SqlSource(url=sqlite_url, table="problems", fetch_rows=2)
    got = list(read_problems_sql(source, limit=5))
    assert [p.source_id for p in got if isinstance(p, Problem)] == [
        f"gsm8k-test-{i}" for i in range(5)
    ]


# -- bad rows ---------------------------------------------------------------------------------


def messages(items: list[Problem | ErrorInfo]) -> list[str]:
    return [i.message if isinstance(i, ErrorInfo) else f"ok {i.source_id}" for i in items]


def test_bad_rows_in_sqlite_are_errors_naming_the_row(sqlite_url: str) -> None:
    items = list(read_problems_sql(SqlSource(url=sqlite_url, table="bad")))
    assert messages(items) == [
        "ok g1",
        "sql:bad#row2: no 'problem' field",
        "sql:bad#row3: field 'problem' must be text, not int",
        "sql:bad#row4: column 'problem' is not UTF-8 (byte 1: b'\\xff')",
        f"sql:bad#row5: {MAX_ROW_BYTES + 10:,} bytes, over the limit of {MAX_ROW_BYTES:,}",
        "ok g2",
    ]
    kinds = [i.kind for i in items if isinstance(i, ErrorInfo)]
    assert kinds == ["malformed_row"] * 3 + ["oversized_row"]


def test_bad_rows_in_postgres_are_errors_naming_the_row(pg: Postgres, password: str) -> None:
    def read(**where: str) -> list[str]:
        source = SqlSource(url=pg_url(pg), password_env=PASSWORD_ENV, **where)
        return messages(list(read_problems_sql(source)))

    not_utf8 = "is not UTF-8 (byte 1: b'\\xff')"
    assert read(table="bad") == [
        "ok g1",
        "sql:bad#row2: no 'problem' field",
        f"sql:bad#row3: {MAX_ROW_BYTES + 10:,} bytes, over the limit of {MAX_ROW_BYTES:,}",
        "ok g2",
        f"sql:bad#row5: column 'data' {not_utf8}",  # any column: the row is not text
    ]
    assert read(query="SELECT id, data AS problem FROM bad ORDER BY n") == [
        "ok g1",
        "sql:query#row2: no 'problem' field",
        "sql:query#row3: no 'problem' field",
        "ok g2",
        f"sql:query#row5: column 'problem' {not_utf8}",
    ]
    assert read(query="SELECT id, num AS problem FROM bad ORDER BY n") == [
        f"sql:query#row{n}: field 'problem' must be text, not int" for n in range(1, 6)
    ]
    source = SqlSource(
        url=pg_url(pg),
        password_env=PASSWORD_ENV,
        query="SELECT data AS problem FROM bad ORDER BY n",
    )
    decoded = [p.statement for p in read_problems_sql(source) if isinstance(p, Problem)]
    assert decoded == ["Two plus two?", "café?"]


def test_database_values_become_text_and_numbers(pg: Postgres, password: str) -> None:
    query = (
        "SELECT 'What is x?' AS problem, 18.00::numeric AS answer, 2.50::numeric AS weight, "
        "timestamp '2024-05-01 12:30' AS seen, date '2024-05-01' AS day, "
        "convert_to('café', 'UTF8') AS note, 'NaN'::numeric AS nan"
    )
    source = SqlSource(url=pg_url(pg), password_env=PASSWORD_ENV, query=query)
    [got] = list(read_problems_sql(source))
    assert isinstance(got, Problem) and got.answer == "18"
    assert got.metadata == {
        "weight": "2.5",
        "seen": "2024-05-01T12:30:00",
        "day": "2024-05-01",
        "note": "café",
        "nan": None,
    }


# -- passwords and errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://reader:hunter2@db:5432/p", "postgresql://reader@db/p?password=hunter2"],
)
def test_a_url_with_a_password_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="password_env") as caught:
        SqlSource(url=url, table="problems")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match="--sql-password-env") as caught:
        InputFields(sql_url=url, table="problems")
    assert "hunter2" not in str(caught.value)


def test_a_dead_server_is_one_error_naming_the_host_not_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.deploy_support import free_port

    port = free_port()
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    source = SqlSource(
        url=f"postgresql+psycopg://reader@127.0.0.1:{port}/p",
        password_env=PASSWORD_ENV,
        table="problems",
    )
    for call in (
        lambda: list(read_problems_sql(source)),
        lambda: check_sql_source(source),
        lambda: sql_identity(source),
    ):
        with pytest.raises(ConfigError) as caught:
            call()
        message = str(caught.value)
        assert f"postgresql+psycopg://reader@127.0.0.1:{port}/p" in message
        assert "Connection refused" in message or "connection failed" in message
        assert "s3cret-pw" not in message
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(ConfigError, match=f"environment variable {PASSWORD_ENV} .* is unset"):
        check_sql_source(source)


def test_a_wrong_password_is_named_but_not_shown(
    pg: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password-42")
    source = SqlSource(url=pg_url(pg), password_env=PASSWORD_ENV, table="problems")
    with pytest.raises(ConfigError, match="password authentication failed") as caught:
        check_sql_source(source)
    assert f"{pg.host}:{pg.port}" in str(caught.value)
    assert "not-the-password-42" not in str(caught.value)
    assert pg.password not in str(caught.value)


def test_check_names_a_missing_table_or_column(sqlite_url: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot read sql:nope at sqlite:///.*no such table"):
        check_sql_source(SqlSource(url=sqlite_url, table="nope"))
    with pytest.raises(ConfigError, match=r"no column 'question' .*columns: id, problem"):
        check_sql_source(SqlSource(url=sqlite_url, table="problems"), FieldMap("question"))
    with pytest.raises(ConfigError, match="syntax error"):
        check_sql_source(SqlSource(url=sqlite_url, query="SELEC nonsense"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"table": "problems; DROP TABLE problems"}, "String should match pattern"),
        ({"table": "t", "query": "SELECT 1"}, "exactly one of query and table"),
        ({}, "exactly one of query and table"),
        ({"table": "t", "input": "x.jsonl"}, "set input or sql_url, not both"),
        ({"table": "t", "domains": ["a"]}, "domain_field and domains together"),
        ({"table": "t", "password_env": "NOT-A-NAME"}, "String should match pattern"),
    ],
)
def test_input_fields_validate_the_sql_source(fields: dict[str, Any], message: str) -> None:
    names = {"password_env": "sql_password_env"}
    data = {names.get(k, k): v for k, v in fields.items()}
    with pytest.raises(ValueError, match=message):
        InputFields(sql_url="sqlite:///x.db", **data)


def test_input_is_still_required_without_sql() -> None:
    with pytest.raises(ValueError, match="input\n  Field required"):
        InputFields()
    with pytest.raises(ValueError, match="go with sql_url"):
        InputFields(input="x.jsonl", table="t")
    assert InputFields(sql_url="sqlite:///x.db", table="t", input="sql").input == "sql"


# -- a server-side cursor on PostgreSQL -------------------------------------------------------


def test_postgres_streams_through_a_server_side_cursor(pg: Postgres, password: str) -> None:
    """While a read is under way the server runs ``FETCH FORWARD fetch_rows`` on a
    declared cursor for it (not one SELECT sending every row), and a read stopped by its
    limit ends its session at once.
    """
    admin = sa.create_engine(_admin_url(pg))
    with admin.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS big")
        conn.exec_driver_sql(
            "CREATE TABLE big AS SELECT g AS n, 'What is ' || g || ' + 1?' AS problem, "
            "(g + 1)::text AS answer FROM generate_series(1, 5000) AS g"
        )

    def sessions() -> list[str]:
        with admin.connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT query FROM pg_stat_activity WHERE application_name = 'mm_stream'"
            )
            return [row[0] for row in found]

    name = "?application_name=mm_stream"
    source = SqlSource(
        url=pg_url(pg, query=name),
        password_env=PASSWORD_ENV,
        query="SELECT * FROM big",
        fetch_rows=100,
    )
    stream: Iterator[Problem | ErrorInfo] = read_problems_sql(source)
    first = next(stream)
    assert isinstance(first, Problem)
    [running] = sessions()
    assert running.startswith("FETCH FORWARD 1 FROM"), running  # SQLAlchemy peeks at a row
    rest = list(islice(stream, 250))  # into the third fetch
    assert len(rest) == 250
    [running] = sessions()
    assert running.startswith("FETCH FORWARD 100 FROM"), running
    cast(Any, stream).close()
    gone(sessions)
    # a limit closes the cursor and its session as soon as it is reached
    got = list(read_problems_sql(source, limit=3))
    assert len(got) == 3
    gone(sessions)
    admin.dispose()


def gone(sessions: Any) -> None:
    """The reading session ended (its server process exits just after the client)."""
    deadline = time.monotonic() + 5
    while sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions() == []


# -- the load stage, the flows' options, the CLI ----------------------------------------------


async def run_load(cfg: LoadConfig) -> Any:
    return await load.fn(cast(Any, None), cfg)


async def test_the_load_stage_reads_sqlite_with_a_domain_filter(sqlite_url: str) -> None:
    params = InputFields(
        sql_url=sqlite_url, table="problems", domain_field="domain", domains=["algebra", "Geometry"]
    )
    cfg = LoadConfig(**params.load_config(chunk_size=16))
    assert cfg.sql is not None and cfg.sql.table == "problems"
    result = await run_load(cfg)
    problems = [p for rows in result.rows.values() for p in rows]
    assert len(problems) == ROWS * 2 // 3
    assert {p.metadata["domain"] for p in problems} == {"Algebra", "geometry"}
    assert result.counts["load.domain_filtered"] == ROWS // 3
    filtered = [d for d in result.dropped if d.reason == "domain_filtered"]
    assert len(filtered) == ROWS // 3
    assert filtered[0].detail == "domain 'ARITHMETIC' is not one of ['algebra', 'Geometry']"
    # the limit counts the problems kept
    limited = params.model_copy(update={"limit": 4})
    result = await run_load(LoadConfig(**limited.load_config(chunk_size=16)))
    kept = [p for rows in result.rows.values() for p in rows]
    assert [p.source_id for p in kept] == [f"gsm8k-test-{i}" for i in (0, 1, 3, 4)]
    assert result.counts["load.domain_filtered"] == 1


async def test_the_load_stage_drops_bad_sqlite_rows(sqlite_url: str) -> None:
    params = InputFields(sql_url=sqlite_url, table="bad")
    result = await run_load(LoadConfig(**params.load_config(chunk_size=16)))
    assert result.counts["load.problems"] == 2 and result.counts["load.malformed_row"] == 4
    assert [d.target_id for d in result.dropped] == [f"sql:bad#row{n}" for n in (2, 3, 4, 5)]
    empty = InputFields(sql_url=sqlite_url, query="SELECT * FROM bad WHERE id = 'null'")
    with pytest.raises(ConfigError, match=r"input sql:query at sqlite:///.*no problems in it"):
        await run_load(LoadConfig(**empty.load_config(chunk_size=16)))


async def test_the_password_is_in_no_error_dropped_row_or_cache_key(
    pg: Postgres, password: str
) -> None:
    params = InputFields(
        input="sql",
        sql_url=pg_url(pg),
        sql_password_env=PASSWORD_ENV,
        table="bad",
        domain_field="id",
        domains=["g1", "null", "huge"],
    )
    params.check_input()
    config = params.load_config(chunk_size=8)
    result = await run_load(LoadConfig(**config))
    reasons = [d.reason for d in result.dropped]
    assert reasons == ["malformed_row", "malformed_row", "domain_filtered", "malformed_row"]
    assert result.counts["load.problems"] == 1
    everything = json.dumps(config) + "".join(d.model_dump_json() for d in result.dropped)
    everything += json.dumps([p.model_dump(mode="json") for r in result.rows.values() for p in r])
    assert pg.password not in everything
    assert "sql:bad#row2: no 'problem' field" in everything


def test_the_identity_follows_the_rows(tmp_path: Path, filled: Any) -> None:
    url = f"sqlite:///{tmp_path / 'id.db'}"
    fill(url, filled[1])
    whole = SqlSource(url=url, table="problems")
    before, first_five = sql_identity(whole), sql_identity(whole, limit=5)
    assert before == sql_identity(whole) and before.startswith("sql:")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE problems SET answer = '19' WHERE id = 'gsm8k-test-40'")
    engine.dispose()
    assert sql_identity(whole) != before
    assert sql_identity(whole, limit=5) == first_five  # row 41 is past what a limit of 5 reads
    fields = InputFields(sql_url=url, table="problems", limit=5)
    assert fields.load_config(1)["identity"] == first_five
    filtered = fields.model_copy(update={"domain_field": "domain", "domains": ["algebra"]})
    assert filtered.load_config(1)["identity"] == sql_identity(whole)  # filtering reads all


def mathmill(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mathmill", *args])
    code = mathmill_cli._run()
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_reads_sqlite(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sql = ("--sql-url", sqlite_url)
    code, out, err = mathmill(
        monkeypatch,
        capsys,
        "run",
        "sample",
        *sql,
        "--table",
        "problems",
        "--limit",
        "3",
        "--domain-field",
        "domain",
        "--domains",
        "algebra,geometry",
        "--dry-run",
    )
    assert code == 0, err
    assert "dry run: parameters are valid, nothing was called" in out
    code, out, err = mathmill(
        monkeypatch, capsys, "run", "tir", *sql, "--query", "SELECT * FROM bad", "--dry-run"
    )
    assert code == 0, err
    assert "2 problems, 4 malformed rows in sql:query at sqlite:///" in out
    code, _, err = mathmill(monkeypatch, capsys, "run", "sample", *sql, "--table", "nope")
    assert code == 1
    assert err.startswith("error: cannot read sql:nope at sqlite:///") and "no such table" in err


async def test_a_sample_flow_dry_run_reads_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    from mathmill.flows.sample import PIPELINE, SampleParams
    from mathmill.pipeline.dag import run_pipeline

    params = SampleParams(
        sql_url=sqlite_url, table="problems", limit=3, dry_run=True, out=str(tmp_path / "run")
    )
    result = await run_pipeline(PIPELINE, params, prefect=False)
    assert result.dry_run
    load_params = PIPELINE.stage_params(params)[0]
    assert isinstance(load_params, LoadConfig)
    assert load_params.sql == params.sql_source() and load_params.identity.startswith("sql:")


@pytest.mark.parametrize(
    "fields",
    [
        {"sql_url": "postgresql://u:s3cretPW@h/db"},
        {"sql_url": "postgresql://u@h/db?sslpassword=s3cretPW", "table": "t"},
        {"input": "x.jsonl", "sql_url": "postgresql://u:s3cretPW@h/db", "table": "t"},
        {"sql_url": "postgresql://u:s3cretPW@h/db", "query": "SELECT 1", "table": "t"},
    ],
)
def test_a_password_never_reaches_a_validation_error(fields: dict[str, Any]) -> None:
    from mathmill.flows.curate import CurateParams

    with pytest.raises((ConfigError, ValidationError)) as e:
        CurateParams(**fields)
    assert "s3cretPW" not in str(e.value) and "sql_url" in str(e.value)
