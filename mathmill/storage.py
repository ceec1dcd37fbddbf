"""Datasets as Parquet chunks under a run directory, on local disk or object storage.

A run directory holds one folder per dataset; a dataset is a set of Parquet chunks,
each named by a key the caller chooses (usually the input chunk's hash, so a re-run
overwrites rather than duplicates). A chunk's reference carries the SHA-256 of its
bytes; reading by reference verifies it.

Writes are atomic. On local disk a chunk is written to a hidden temporary file,
flushed, fsynced and renamed into place; on S3-compatible storage it is one PUT,
which becomes visible only when complete. A crash never leaves a half-written file
under a chunk's name, and hidden temporaries are never listed.

An object store that cannot be reached (connection refused or dropped, timeouts) is
tried again for up to :attr:`StorageConfig.retry_s` (60 s unless
``MATHMILL_STORAGE_RETRY_S`` says otherwise), then is a :class:`StorageError` naming the
endpoint, so a short outage costs a run nothing and a long one stops it cleanly.

>>> import tempfile
>>> from mathmill.records import Problem
>>> store = RunStore(tempfile.mkdtemp())
>>> ref = store.dataset("problems").write_chunk("00000", [Problem(statement="1+1?")])
>>> [p.statement for p in store.dataset("problems").read_chunk(ref)]
['1+1?']
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mathmill.codec import from_table, to_table
from mathmill.errors import ConfigError, StorageError
from mathmill.records import RECORD_TYPES, Record

__all__ = ["ChunkRef", "Dataset", "RunStore", "StorageConfig", "masked_url"]

R = TypeVar("R", bound=Record)
T = TypeVar("T")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}$")
_SUFFIX = ".parquet"
_TMP_PREFIX = ".tmp-"
# Errors of an object store that cannot be reached (refused, dropped, timed out), by
# class name: botocore's and aiohttp's have no common base with Python's own.
_UNREACHABLE = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "FSTimeoutError",
    }
)


# An endpoint this process has not reached yet (a typo, a server not started) is tried
# for at most FIRST_CONTACT_S: the long wait (retry_s) is for an outage in mid-run.
FIRST_CONTACT_S = 5.0
_REACHED: set[str] = set()


def masked_url(url: str) -> str:
    """``url`` with user, password and query replaced by ``***``.

    >>> masked_url("http://key:secret@minio:9000/?token=x")
    'http://***@minio:9000/?***'
    """
    parts = urllib.parse.urlsplit(url)
    if not (parts.username or parts.password or parts.query):
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username or parts.password:
        netloc = "***@" + netloc
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, "***" if parts.query else "", parts.fragment)
    )


def _retry_s_default() -> float:
    try:
        return max(0.0, float(os.environ.get("MATHMILL_STORAGE_RETRY_S", "60")))
    except ValueError as e:
        raise ConfigError("MATHMILL_STORAGE_RETRY_S: expected a number of seconds") from e


class StorageConfig(BaseModel):
    """Where a run's datasets live.

    ``url`` is a local path or ``s3://bucket/prefix``. For S3-compatible servers
    (MinIO, moto, R2) set ``endpoint_url``. Credentials default to the usual AWS
    environment variables and files; pass them here only from a secret store.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Run directory: a local path or s3://bucket/prefix.")
    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("MATHMILL_S3_ENDPOINT_URL"),
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000.",
        examples=["http://127.0.0.1:9000"],
    )
    key: SecretStr | None = Field(None, description="Access key id (else from the environment).")
    secret: SecretStr | None = Field(None, description="Secret key (else from the environment).")
    region: str | None = Field(None, description="Region name, if the server needs one.")
    retry_s: float = Field(
        default_factory=_retry_s_default,
        ge=0,
        description="How long a call to object storage is tried again while its endpoint "
        "cannot be reached (refused, dropped, timed out) before the run stops "
        "(default $MATHMILL_STORAGE_RETRY_S, else 60).",
    )


class ChunkRef(BaseModel):
    """A small reference to one written chunk: where, what, how many rows, which bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    key: str
    path: str = Field(description="Full path or URL of the Parquet file.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    record_type: str


def _filesystem(config: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol, _, rest = config.url.partition("://")
    if not rest:
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(config.url))
    if protocol in ("s3", "s3a"):
        options: dict[str, Any] = {}
        client_kwargs: dict[str, Any] = {}
        if config.endpoint_url:
            client_kwargs["endpoint_url"] = config.endpoint_url
        if config.region:
            client_kwargs["region_name"] = config.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        if config.key is not None:
            options["key"] = config.key.get_secret_value()
        if config.secret is not None:
            options["secret"] = config.secret.get_secret_value()
        try:
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        except ImportError as e:
            raise ConfigError("s3:// storage needs the s3 extra: pip install 'mathmill[s3]'") from e
        return fs, rest.rstrip("/")
    if protocol == "file":
        return fsspec.filesystem("file"), os.path.abspath(rest)
    try:
        return fsspec.filesystem(protocol), rest.rstrip("/")
    except (ImportError, ValueError) as e:
        raise ConfigError(f"unsupported storage URL {config.url!r}: {e}") from e


class RunStore:
    """A run directory: datasets by name, plus small text artifacts (reports, manifests)."""

    def __init__(self, url: str | StorageConfig) -> None:
        self.config = url if isinstance(url, StorageConfig) else StorageConfig(url=url)
        self.fs, self.root = _filesystem(self.config)
        self.is_local = "file" in _protocols(self.fs)
        self._down_until = 0.0  # a call ran out of retries: others fail at once until then
        self._down_reason = ""
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    @functools.cached_property
    def endpoint(self) -> str:
        """The object store's endpoint, for messages (``S3`` when the default one), with
        any user, password or query in the URL masked.
        """
        return (
            masked_url(self.config.endpoint_url)
            if self.config.endpoint_url
            else (_protocols(self.fs)[0].upper())
        )

    def _scrub(self, text: str) -> str:
        """``text`` (an error's) with the endpoint URL's secrets masked."""
        raw = self.config.endpoint_url
        return text.replace(raw, self.endpoint) if raw else text

    def _call(self, action: str, path: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(path, *args)`` on the filesystem. On object storage, an unreachable
        endpoint (connection refused or dropped, timeouts) is tried again with backoff
        for up to ``config.retry_s`` seconds, then is a :class:`StorageError` naming the
        endpoint and the path; for the next ``retry_s`` seconds other calls then fail
        at once with the same error instead of each waiting as long (the run stops in
        one wait, not one per chunk). An endpoint this process never reached is tried
        for :data:`FIRST_CONTACT_S` at most (a wrong URL fails fast). Other errors pass
        through unchanged.
        """
        if self.is_local:
            return fn(path, *args)
        started = time.monotonic()
        if started < self._down_until:
            raise StorageError(
                f"storage endpoint {self.endpoint} unreachable while {action} "
                f"{self._public(path)} (not tried again: it was down a moment ago: "
                f"{self._down_reason})"
            )
        reached = self.endpoint in _REACHED
        budget = self.config.retry_s if reached else min(self.config.retry_s, FIRST_CONTACT_S)
        delay = 0.25
        while True:
            try:
                result = fn(path, *args)
            except Exception as e:
                if not _unreachable(e):
                    _REACHED.add(self.endpoint)  # it answered (e.g. no such object)
                    raise
                waited = time.monotonic() - started
                if waited + delay > budget:
                    self._down_until = time.monotonic() + budget
                    self._down_reason = self._scrub(str(e))
                    hint = "" if reached else "; never reached by this run: is the endpoint right?"
                    raise StorageError(
                        f"storage endpoint {self.endpoint} unreachable while {action} "
                        f"{self._public(path)} (tried for {waited:.0f}s{hint}): "
                        f"{self._scrub(str(e))}"
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                _REACHED.add(self.endpoint)
                return result

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    @property
    def url(self) -> str:
        """The run directory as a path (local) or URL (object storage)."""
        return self.root if self.is_local else f"{_protocols(self.fs)[0]}://{self.root}"

    def dataset(self, name: str) -> Dataset:
        """The dataset called ``name`` in this run (created on first write)."""
        return Dataset(self, _check_key(name, "dataset name"))

    def datasets(self) -> list[str]:
        """Names of the datasets that have at least one chunk."""
        if not self._call("checking", self.root, self.fs.exists):
            return []
        names = []
        for entry in self._call("listing", self.root, self.fs.ls, True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            is_dir = entry["type"] == "directory" and not name.startswith(".")
            if is_dir and self.dataset(name).keys():
                names.append(name)
        return sorted(names)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file under the run directory atomically; returns its path or URL."""
        path = f"{self.root}/{relpath}"
        _atomic_write(self, path, data)
        return self._public(path)

    def write_stream(self, relpath: str, parts: Iterable[bytes]) -> str:
        """Write a large file under the run directory from an iterable of byte strings,
        without holding it in memory; see :meth:`open_write`.
        """
        with self.open_write(relpath) as f:
            for part in parts:
                f.write(part)
        return self._public(f"{self.root}/{relpath}")

    @contextlib.contextmanager
    def open_write(self, relpath: str) -> Iterator[IO[bytes]]:
        """A file under the run directory to write in pieces (several may be open at
        once). Readers see the whole file or none of it: a local temporary renamed into
        place on success; an S3 multipart upload completed on success, discarded when
        the block raises.
        """
        path = f"{self.root}/{relpath}"
        with _atomic_file(self, path) as f:
            yield f

    def exists(self, relpath: str) -> bool:
        """Whether a file exists under the run directory."""
        return bool(self._call("checking", f"{self.root}/{relpath}", self.fs.exists))

    def read_bytes(self, relpath: str) -> bytes:
        """Read a file written with :meth:`write_bytes`."""
        path = f"{self.root}/{relpath}"
        try:
            data: bytes = self._call("reading", path, self.fs.cat_file)
        except FileNotFoundError as e:
            raise StorageError(f"no file {self._public(path)}") from e
        return data

    def _public(self, path: str) -> str:
        return path if self.is_local else f"{_protocols(self.fs)[0]}://{path}"


class Dataset:
    """One dataset of a run: Parquet chunks of a single record type."""

    def __init__(self, store: RunStore, name: str) -> None:
        self.store = store
        self.name = name
        self.path = f"{store.root}/{name}"

    def __repr__(self) -> str:
        return f"Dataset({self.store.url!r}, {self.name!r})"

    def _chunk_path(self, key: str) -> str:
        return f"{self.path}/{key}{_SUFFIX}"

    def write_chunk(self, key: str, records: Sequence[Record]) -> ChunkRef:
        """Write records (all of one type) as the chunk ``key``, atomically.

        Writing an existing key replaces it, so a re-run of the same input chunk
        never duplicates rows.
        """
        _check_key(key, "chunk key")
        if not records:
            raise StorageError(f"{self}: refusing to write an empty chunk {key!r}")
        model = type(records[0])
        data = _to_parquet(to_table(records, model))
        path = self._chunk_path(key)
        _atomic_write(self.store, path, data)
        return ChunkRef(
            dataset=self.name,
            key=key,
            path=self.store._public(path),
            sha256=hashlib.sha256(data).hexdigest(),
            rows=len(records),
            nbytes=len(data),
            record_type=model.__name__,
        )

    def keys(self) -> list[str]:
        """Keys of the complete chunks, sorted. Hidden temporaries are never listed."""
        try:
            names = self.store._call("listing", self.path, self.store.fs.ls, False)
        except FileNotFoundError:
            return []
        keys = []
        for name in names:
            base = str(name).rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(_SUFFIX) and not base.startswith("."):
                keys.append(base[: -len(_SUFFIX)])
        return sorted(keys)

    def ref(self, key: str) -> ChunkRef | None:
        """The reference of chunk ``key``, or None when it was never completed."""
        try:
            data = self.store._call("reading", self._chunk_path(key), self.store.fs.cat_file)
        except FileNotFoundError:
            return None
        table = self._parse(key, data)
        return ChunkRef(
            dataset=self.name,
            key=key,
            path=self.store._public(self._chunk_path(key)),
            sha256=hashlib.sha256(data).hexdigest(),
            rows=table.num_rows,
            nbytes=len(data),
            record_type=_record_type_name(table, self._chunk_path(key)),
        )

    def has(self, key: str) -> bool:
        """Whether chunk ``key`` exists (complete: temporaries are never chunks)."""
        path = self._chunk_path(_check_key(key, "chunk key"))
        return bool(self.store._call("checking", path, self.store.fs.exists))

    def delete_chunk(self, key: str) -> None:
        """Remove chunk ``key`` (no error when it does not exist)."""
        path = self._chunk_path(_check_key(key, "chunk key"))
        with contextlib.suppress(FileNotFoundError):
            self.store._call("deleting", path, self.store.fs.rm_file)

    def remove_temporaries(self, older_than_s: float = 600.0) -> int:
        """Delete the hidden temporaries of writes that never finished (a process killed
        mid-write leaves one; they are never read as chunks) once older than
        ``older_than_s``, so that a write in progress elsewhere is left alone. Local
        directories only (object storage writes leave no temporaries). Returns how many.
        """
        if not self.store.is_local or not os.path.isdir(self.path):
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in os.scandir(self.path):
            if entry.name.startswith(_TMP_PREFIX) and entry.stat().st_mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def refs(self) -> list[ChunkRef]:
        """References of all complete chunks, sorted by key."""
        return [ref for key in self.keys() if (ref := self.ref(key)) is not None]

    def read_table(self, ref: ChunkRef | str) -> pa.Table:
        """One chunk as an Arrow table; a ChunkRef's hash is verified."""
        key = ref.key if isinstance(ref, ChunkRef) else ref
        path = self._chunk_path(key)
        try:
            data = self.store._call("reading", path, self.store.fs.cat_file)
        except FileNotFoundError as e:
            raise StorageError(f"{self}: chunk {key!r} not found at {path}") from e
        if isinstance(ref, ChunkRef):
            digest = hashlib.sha256(data).hexdigest()
            if digest != ref.sha256:
                raise StorageError(
                    f"{self}: chunk {key!r} changed since it was referenced "
                    f"(sha256 {digest[:12]} != {ref.sha256[:12]})"
                )
        return self._parse(key, data)

    def read_chunk(self, ref: ChunkRef | str, model: type[R] | None = None) -> list[R]:
        """One chunk's records, as the type recorded in the file unless ``model`` is given."""
        table = self.read_table(ref)
        cls: type[Any] = model or RECORD_TYPES[_record_type_name(table, self.path)]
        return from_table(table, cls)

    def iter_records(self, model: type[R] | None = None) -> Iterator[R]:
        """All records of all complete chunks, in key order."""
        for key in self.keys():
            yield from self.read_chunk(key, model)

    def read_all(self, model: type[R] | None = None) -> list[R]:
        """All records of all complete chunks, in key order."""
        return list(self.iter_records(model))

    def to_table(self) -> pa.Table:
        """All chunks concatenated as one Arrow table (for polars, pandas, datasets)."""
        tables = [self.read_table(key) for key in self.keys()]
        if not tables:
            raise StorageError(f"{self}: no complete chunks")
        return pa.concat_tables(tables)

    def _parse(self, key: str, data: bytes) -> pa.Table:
        try:
            # One file, one reader: pq.read_table() on an in-memory buffer goes through
            # the dataset API, whose threads abort the interpreter at exit (pyarrow
            # 26.0.1: "terminate called without an active exception", ~1 run in 3).
            return pq.ParquetFile(pa.BufferReader(data)).read()
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{self}: chunk {key!r} is not valid Parquet: {e}") from e


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the storage endpoint could not be reached (worth waiting
    for), as opposed to an answer from it (missing object, access denied, bad request).
    """
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return any(cls.__name__ in _UNREACHABLE for cls in type(error).__mro__)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _check_key(key: str, what: str) -> str:
    if not _KEY.match(key):
        raise StorageError(
            f"invalid {what} {key!r}: use letters, digits, '_', '.', '=', '-' (max 128)"
        )
    return key


def _record_type_name(table: pa.Table, where: str) -> str:
    meta = table.schema.metadata or {}
    name = meta.get(b"mathmill.record_type", b"").decode()
    if name not in RECORD_TYPES:
        raise StorageError(f"{where}: unknown record type {name!r} in Parquet metadata")
    return name


def _to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _atomic_write(store: RunStore, path: str, data: bytes) -> None:
    if not store.is_local:
        # One PUT: S3 makes the object visible only once it is complete.
        try:
            store._call("writing", path, store.fs.pipe_file, data)
        except StorageError:
            raise
        except Exception as e:  # botocore/aiohttp errors have no common base
            raise StorageError(f"writing {store._public(path)} failed: {e}") from e
        return
    with _atomic_file(store, path) as f:
        f.write(data)


@contextlib.contextmanager
def _atomic_file(store: RunStore, path: str) -> Iterator[IO[bytes]]:
    """A file that appears at ``path`` only when the block ends without an error.
    Errors of the block itself pass through unchanged; the storage's own are
    :class:`StorageError` naming the path.
    """
    public = store._public(path)
    if not store.is_local:
        try:
            remote = store.fs.open(path, "wb")
        except Exception as e:  # botocore/aiohttp errors have no common base
            raise StorageError(f"writing {public} failed: {e}") from e
        try:
            yield remote
        except BaseException:
            remote.discard()  # abort the multipart upload: no partial object
            remote.closed = True  # so that garbage collection does not try to commit it
            raise
        try:
            remote.close()
        except Exception as e:
            raise StorageError(f"writing {public} failed: {e}") from e
        return
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        try:
            os.makedirs(directory, exist_ok=True)
            local = open(tmp, "wb")  # noqa: SIM115 (closed below, before the rename)
        except OSError as e:
            raise StorageError(f"writing {path} failed: {e}") from e
        with local:
            yield local
            try:
                local.flush()
                os.fsync(local.fileno())
            except OSError as e:
                raise StorageError(f"writing {path} failed: {e}") from e
        try:
            os.replace(tmp, path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StorageError(f"writing {path} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
