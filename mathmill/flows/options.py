"""Parameter models shared by the flows: models per role, the sandbox, run options.

They are strict pydantic models (``extra="forbid"``, bounded fields with descriptions)
so the Prefect UI renders them as forms and a bad value fails before the first LLM
call, naming the field. API keys are never parameters: a role names the environment
variable that holds its key.

A role's endpoint fields share their descriptions and bounds with the client's
``EndpointConfig`` and the ``LLMEndpoint`` block (:mod:`mathmill.llm.config`);
:class:`SandboxOptions` lives in :mod:`mathmill.sandbox.options`, below the blocks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from mathmill.blocks.storage import block_ref, load_storage
from mathmill.errors import ConfigError
from mathmill.llm.config import (
    BASE_URL,
    CACHE_BY_URL,
    CONCURRENCY_LIMIT,
    MAX_CONCURRENCY,
    MAX_RETRIES,
    MODEL,
    STRUCTURED_MODE,
    TIMEOUT_S,
    EndpointConfig,
    StructuredMode,
)
from mathmill.records import ErrorInfo, Problem
from mathmill.sandbox.options import SandboxOptions
from mathmill.sources import FieldMap
from mathmill.sources_sql import SqlSource, check_sql_source, read_input, sql_identity
from mathmill.storage import StorageConfig

__all__ = ["InputFields", "ModelRole", "SandboxOptions", "StorageFields", "resolve_role"]

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"
_ENDPOINT_FIELDS = ("block", "base_url", "api_key_env")
T = TypeVar("T")


class ModelRole(BaseModel):
    """Which model plays a role, and how to call it. Unset fields fall back to the
    flow's default model (the embedded local model when it has no endpoint either),
    then to the role's built-in sampling defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    block: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Name of a saved 'mathmill LLM endpoint' block (URL, key, limits, "
        "prices); the fields below override it. Not with base_url.",
        examples=["openrouter"],
    )
    base_url: Annotated[str | None, BASE_URL] = None
    model: Annotated[str | None, MODEL] = None
    api_key_env: str | None = Field(
        None,
        pattern=_ENV_NAME,
        description="Name of the environment variable holding the API key (never the key).",
        examples=["OPENAI_API_KEY"],
    )
    max_concurrency: Annotated[int | None, MAX_CONCURRENCY] = None
    concurrency_limit: Annotated[str | None, CONCURRENCY_LIMIT] = None
    timeout_s: Annotated[float | None, TIMEOUT_S] = None
    max_retries: Annotated[int | None, MAX_RETRIES] = None
    structured_mode: Annotated[StructuredMode | None, STRUCTURED_MODE] = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int | None = Field(None, ge=16, le=131072, description="Tokens per reply.")
    cache_by_url: Annotated[bool | None, CACHE_BY_URL] = None

    @model_validator(mode="after")
    def _one_endpoint(self) -> ModelRole:
        if self.block and self.base_url:
            raise ValueError("set block or base_url, not both")
        return self

    def over(self, default: ModelRole) -> ModelRole:
        """This role with its unset fields taken from ``default``. Where the endpoint is
        (block, base URL, key variable) comes whole from one of the two, so a key is
        never sent to another role's server.
        """
        mine = self.model_dump(exclude_none=True)
        theirs = default.model_dump(exclude_none=True)
        if "block" in mine or "base_url" in mine:
            for field in _ENDPOINT_FIELDS:
                theirs.pop(field, None)
        if "block" in mine:
            theirs.pop("model", None)  # the block names its model
        return ModelRole(**(theirs | mine))


def resolve_role(
    role: ModelRole,
    name: str,
    embedded: EndpointConfig | None,
    block: EndpointConfig | None = None,
) -> EndpointConfig:
    """The endpoint a (merged) role calls: its block's (``block``, loaded by the
    caller), its own base URL, or the embedded model's; the role's fields override.

    Raises :class:`ConfigError` naming the role when its key variable is unset.
    """
    if block is not None:
        base = block
    elif role.base_url is None:
        if embedded is None:
            raise ConfigError(f"models.{name}: no base_url and no embedded model")
        base = embedded
    else:
        if not role.model:
            raise ConfigError(f"models.{name}.model: required with base_url {role.base_url}")
        base = EndpointConfig(base_url=role.base_url, model=role.model)
    local = block is None and role.base_url is None  # the embedded model serves one at a time
    update: dict[str, object] = {"name": f"{name}:{role.model or base.model}"}
    if role.api_key_env and not local:
        value = os.environ.get(role.api_key_env)
        if not value:
            raise ConfigError(
                f"models.{name}.api_key_env: environment variable {role.api_key_env} is unset"
            )
        update["api_key"] = SecretStr(value)
    for field in (
        "max_concurrency",
        "concurrency_limit",
        "timeout_s",
        "max_retries",
        "structured_mode",
        "cache_by_url",
    ):
        value = getattr(role, field)
        if value is not None and not (local and field in ("max_concurrency", "concurrency_limit")):
            update[field] = value
    if role.model and not local:
        update["model"] = role.model
    return base.model_copy(update=update)


_BLOCK_REF = r"^([a-z0-9-]+/)?[A-Za-z0-9][A-Za-z0-9_-]*$"


class StorageFields(BaseModel):
    """Where a flow's run directory and Prefect task results live (mixed into the flows'
    parameters).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    storage_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for s3:// run directories (MinIO, moto).",
        examples=["http://minio:9000"],
    )
    storage_block: str | None = Field(
        None,
        pattern=_BLOCK_REF,
        description="Storage block holding the run directory ('s3-bucket/NAME', or NAME for "
        "an s3-bucket block; also local-file-system / remote-file-system); `out` is then a "
        "path inside it, readable by workers on other machines.",
        examples=["s3-bucket/mathmill-data"],
    )
    results_block: str | None = Field(
        None,
        pattern=_BLOCK_REF,
        description="Storage block for Prefect's task results (default: storage_block, else "
        "Prefect's default result storage).",
        examples=["s3-bucket/mathmill-results"],
    )

    def result_storage(self) -> str | None:
        """``slug/name`` of the block that holds Prefect's task results, if any."""
        name = self.results_block or self.storage_block
        return block_ref(name) if name else None

    def with_results(self, task_: T) -> T:
        """``task_`` with its results in :meth:`result_storage` (unchanged when unset)."""
        storage = self.result_storage()
        if storage is None:
            return task_
        configured: T = task_.with_options(result_storage=storage)  # type: ignore[attr-defined]
        return configured

    async def storage_config(self, out: str) -> StorageConfig:
        """Where the run directory ``out`` is: itself, or a path inside ``storage_block``."""
        return await load_storage(out, self.storage_block, self.storage_endpoint_url)


class InputFields(BaseModel):
    """Where a flow's problems come from and which fields hold what (mixed into the
    parameters of flows that read problems): ``input`` (a file, a directory, a dataset)
    or a SQL database (``sql_url`` with ``query`` or ``table``); optionally only the
    rows of some domains. Validation errors never echo the values given (a URL with a
    password must not reach a log).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    input: str = Field(
        "",
        description="A .jsonl or .parquet file, a local dataset directory, or hf:NAME[:CONFIG] "
        "(empty, or 'sql', with sql_url).",
        examples=["tests/data/gsm8k_5.jsonl", "hf:openai/gsm8k:main"],
    )
    split: str = Field("test", description="Dataset split (directories and hf: inputs).")
    id_field: str | None = Field("id", description="Input field with the row's id.")
    prompt_field: str = Field("problem", description="Input field with the problem text.")
    answer_field: str | None = Field(
        "answer", description="Input field with the expected answer (none: unvalidated)."
    )
    limit: int | None = Field(None, ge=1, description="At most this many problems.")
    sql_url: str | None = Field(
        None,
        min_length=1,
        description="Read the problems from this SQL database instead of input: a SQLAlchemy "
        "URL without the password (sqlite:///FILE, postgresql+psycopg://USER@HOST:PORT/DB), "
        "with query or table.",
        examples=["sqlite:///problems.db", "postgresql+psycopg://reader@db:5432/problems"],
    )
    sql_password_env: str | None = Field(
        None,
        pattern=_ENV_NAME,
        description="Name of the environment variable holding the database password (never "
        "the password).",
        examples=["PROBLEMS_DB_PASSWORD"],
    )
    query: str | None = Field(
        None,
        min_length=1,
        description="With sql_url: the SELECT whose rows are the problems (add ORDER BY for a "
        "stable order). Not with table.",
        examples=["SELECT id, problem, answer FROM problems WHERE level >= 3 ORDER BY id"],
    )
    table: str | None = Field(
        None,
        pattern=_IDENTIFIER,
        description="With sql_url: the table (or schema.table) whose rows are the problems. "
        "Not with query.",
        examples=["problems"],
    )
    domain_field: str | None = Field(
        None,
        min_length=1,
        description="Input field with each row's domain; with domains, only those rows are "
        "read (the others are dropped as domain_filtered).",
        examples=["domain"],
    )
    domains: list[str] | None = Field(
        None,
        min_length=1,
        description="Keep only rows whose domain_field is one of these (any case).",
        examples=[["algebra", "geometry"]],
    )

    @model_validator(mode="wrap")
    @classmethod
    def _one_source(cls, data: Any, handler: Any) -> Any:
        """An input or a SQL database, never both, never none (``input`` is reported
        missing as when it was required).
        """
        if isinstance(data, dict) and not data.get("input") and not data.get("sql_url"):
            missing = InitErrorDetails(type="missing", loc=("input",), input=data)
            raise ValidationError.from_exception_data(cls.__name__, [missing])
        return handler(data)

    @field_validator("sql_url")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        """A password in the URL is refused before anything else looks at it."""
        return None if url is None else SqlSource.check_url(url)

    @model_validator(mode="after")
    def _sql_and_domains(self) -> InputFields:
        if self.sql_url is not None:
            if self.input not in ("", "sql"):
                raise ValueError("set input or sql_url, not both (input may be 'sql')")
            if (self.query is None) == (self.table is None):
                raise ValueError("sql_url needs exactly one of query and table")
            self.sql_source()  # refuses a password in the URL
        elif self.query is not None or self.table is not None or self.sql_password_env:
            raise ValueError("query, table and sql_password_env go with sql_url")
        if (self.domain_field is None) != (self.domains is None):
            raise ValueError("set domain_field and domains together")
        return self

    def sql_source(self) -> SqlSource | None:
        """The SQL database to read, when ``sql_url`` is set."""
        if self.sql_url is None:
            return None
        return SqlSource(
            url=self.sql_url,
            password_env=self.sql_password_env,
            query=self.query,
            table=self.table,
        )

    def field_map(self) -> FieldMap:
        """Which input fields the load stage reads (the solution stays in metadata)."""
        return FieldMap(
            statement=self.prompt_field,
            answer=self.answer_field,
            solution=None,
            source_id=self.id_field,
        )

    def input_name(self) -> str:
        """The input as messages name it (a SQL source without its password)."""
        sql = self.sql_source()
        return sql.describe() if sql is not None else self.input

    def read(self) -> Iterator[Problem | ErrorInfo]:
        """The input's rows as the load stage reads them, up to ``limit`` problems
        (before the domain filter).
        """
        fields = self.field_map()
        return read_input(self.input, self.sql_source(), fields, split=self.split, limit=self.limit)

    def check_input(self) -> None:
        """Fail before anything starts when a local input does not exist, or a SQL source
        cannot be read (connects, runs the query, fetches a row).
        """
        sql = self.sql_source()
        if sql is not None:
            check_sql_source(sql, self.field_map())
            return
        source = self.input
        if not source.startswith("hf:") and not os.path.exists(source):
            raise ConfigError(f"input {source!r} does not exist (a file, a directory or hf:NAME)")

    def load_config(self, chunk_size: int) -> dict[str, Any]:
        """The load stage's config (its cache key): the input and its identity, the
        fields, the limit, the domain filter and the chunk size. A SQL source's identity
        reads its rows (:func:`~mathmill.sources_sql.sql_identity`).
        """
        sql = self.sql_source()
        if sql is not None:
            rows_read = None if self.domains else self.limit  # filtering reads further
            identity = sql_identity(sql, self.field_map(), limit=rows_read)
        else:
            identity = _input_identity(self.input)
        return {
            "input": self.input,
            "identity": identity,
            "sql": sql.model_dump() if sql is not None else None,
            "split": self.split,
            "id_field": self.id_field,
            "prompt_field": self.prompt_field,
            "answer_field": self.answer_field,
            "limit": self.limit,
            "domain_field": self.domain_field,
            "domains": self.domains,
            "chunk_size": chunk_size,
        }


def _input_identity(source: str) -> str:
    """What the load stage's cache key uses for the input: a file's content hash, a
    directory's file list with sizes and times, or the dataset name.
    """
    path = Path(source)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"file:{digest.hexdigest()}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files
        ]
        return "dir:" + hashlib.sha256(repr(listing).encode()).hexdigest()
    return source
