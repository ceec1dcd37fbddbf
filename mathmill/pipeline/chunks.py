"""The machinery every chunked stage shares: the run's resources, chunk specs with
their cache keys, idempotent chunk output, bounded row concurrency, drop records.

A stage is a plain async function over a chunk of rows. :func:`run_chunk` wraps it:
it skips a chunk whose output is already complete in the run directory, writes the
output datasets, then a small completion manifest (last, so a chunk is done only
once everything it wrote is there), and returns a :class:`StageOutput` reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import importlib.util
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import ConfigError, IncompleteChunk, MathmillError
from mathmill.llm.client import LLMClient, LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.prompts import load_prompt
from mathmill.records import Dropped, ErrorInfo, Record
from mathmill.sandbox.protocol import Sandbox
from mathmill.storage import ChunkRef, RunStore

if TYPE_CHECKING:
    from mathmill.tasks.generation import GenBackend

__all__ = [
    "ChunkSpec",
    "IncompleteChunk",
    "Runtime",
    "StageOutput",
    "chunk_cache_key",
    "current_runtime",
    "drop",
    "fingerprint",
    "map_rows",
    "prompt_hashes",
    "raise_if_transient",
    "run_chunk",
    "split_rows",
    "use_runtime",
]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Runtime:
    """What a run's stages share: the run directory, LLM clients by role, the sandbox."""

    store: RunStore
    pool: LLMPool
    endpoints: dict[str, EndpointConfig]
    sandbox: Sandbox | None = None
    row_concurrency: int = 64
    extra: dict[str, Any] = field(default_factory=dict)
    backends: dict[str, GenBackend] = field(default_factory=dict)
    """Roles whose generation runs on vLLM (the engine here, or the ``generate``
    deployment on the vllm pool) instead of their endpoint."""
    params: Any = None
    """The pipeline's params (``out`` and storage fields tell deployment runs on other
    machines where the run directory is)."""

    def identity(self, role: str) -> Any:
        """What a role's answers depend on, for cache keys: its endpoint's identity, or
        the engine's (model, dtype, ...) when it generates on vLLM.
        """
        backend = self.backends.get(role)
        if backend is not None and backend.kind != "endpoint" and backend.engine is not None:
            # the engine's code maps requests to vLLM's (no call cache replays them)
            return {"engine": backend.engine.identity(), "code": _engine_code()}
        return self.endpoints[role].identity

    def client(self, role: str) -> LLMClient:
        """The LLM client of ``role`` (generator, reasoner, coder, critic, rewriter)."""
        try:
            return self.pool.client(self.endpoints[role])
        except KeyError as e:
            raise ConfigError(f"no endpoint configured for role {role!r}") from e

    def require_sandbox(self) -> Sandbox:
        """The sandbox; a stage that runs code cannot go on without one."""
        if self.sandbox is None:
            raise ConfigError("this stage runs code but the run has no sandbox")
        return self.sandbox


@functools.cache
def _engine_code() -> str:
    """SHA-256 of the vLLM engine backend's source (read, not imported)."""
    spec = importlib.util.find_spec("mathmill.llm.vllm_engine")
    origin = spec.origin if spec is not None else None
    return hashlib.sha256(Path(origin).read_bytes() if origin else b"").hexdigest()


_RUNTIME: contextvars.ContextVar[Runtime] = contextvars.ContextVar("mathmill_runtime")


def current_runtime() -> Runtime:
    """The runtime of the flow run this task belongs to."""
    try:
        return _RUNTIME.get()
    except LookupError as e:
        raise MathmillError("no mathmill runtime: call stage tasks inside a mathmill flow") from e


@contextlib.contextmanager
def use_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` current for this flow run (and the tasks it awaits)."""
    token = _RUNTIME.set(runtime)
    try:
        yield runtime
    finally:
        _RUNTIME.reset(token)


def fingerprint(value: Any) -> str:
    """SHA-256 of a canonical JSON form of ``value`` (pydantic models included)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_hashes(*template_ids: str) -> dict[str, str]:
    """Template id -> SHA-256 of its file."""
    return {t: load_prompt(t).ref.sha256 for t in template_ids}


class ChunkSpec(BaseModel):
    """Everything that determines one chunk's output; its hash is the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    index: int = Field(ge=0)
    inputs: list[ChunkRef] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    prompts: dict[str, str] = Field(default_factory=dict)
    code: str = ""
    store_url: str

    def cache_key(self) -> str:
        """Input chunks' content hashes, stage config, prompt hashes, stage code, run dir."""
        return fingerprint(
            {
                "stage": self.stage,
                "index": self.index,
                "inputs": [ref.sha256 for ref in self.inputs],
                "config": self.config,
                "prompts": self.prompts,
                "code": self.code,
                "store": self.store_url,
            }
        )

    @property
    def key(self) -> str:
        """The output chunk key: the index (for order) and a short cache key."""
        return f"{self.index:05d}-{self.cache_key()[:16]}"


class StageOutput(BaseModel):
    """A finished chunk: the chunks it wrote, by dataset, and its counts by outcome."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    key: str
    refs: dict[str, ChunkRef] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    reused: bool = Field(False, description="Found complete in the run directory.")


def _manifest_path(spec: ChunkSpec) -> str:
    return f".stages/{spec.stage}/{spec.key}.json"


def chunk_cache_key(_context: object, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn`` for tasks whose first parameter is ``spec``.

    A complete chunk's key ends in the digest of its completion file, so a cached
    result is only ever the one recorded for the files now in the run directory (never
    one pointing at chunks deleted since). A chunk not yet complete gets a key of its
    own that no later run asks for: its result is still persisted (to the flow's result
    storage), and the next run finds the chunk complete in the run directory.
    """
    spec = parameters["spec"]
    assert isinstance(spec, ChunkSpec)
    base = f"mathmill-{spec.stage}-{spec.cache_key()}"
    done = _finished_bytes(current_runtime().store, spec)
    if done is None:
        return f"{base}-new-{uuid.uuid4().hex[:12]}"
    return f"{base}-{hashlib.sha256(done[1]).hexdigest()[:16]}"


def _finished_bytes(store: RunStore, spec: ChunkSpec) -> tuple[StageOutput, bytes] | None:
    """The chunk's output and completion file if it is complete: the file and every
    chunk it names exist (an earlier run with other settings, or a user, may have
    removed some).
    """
    manifest = _manifest_path(spec)
    if not store.exists(manifest):
        return None
    data = store.read_bytes(manifest)
    done = StageOutput.model_validate_json(data)
    for ref in done.refs.values():
        if not store.dataset(ref.dataset).has(ref.key):
            return None
    return done, data


def _finished(store: RunStore, spec: ChunkSpec) -> StageOutput | None:
    """The chunk's output if it is complete (see :func:`_finished_bytes`)."""
    done = _finished_bytes(store, spec)
    return None if done is None else done[0]


async def run_chunk(
    spec: ChunkSpec,
    compute: Callable[[], Awaitable[tuple[dict[str, Sequence[Record]], Counter[str]]]],
) -> StageOutput:
    """Run one chunk of a stage once: reuse its output if complete, else compute,
    write every output dataset (``dropped`` included) and the completion manifest.
    """
    store = current_runtime().store
    manifest = _manifest_path(spec)
    if (done := _finished(store, spec)) is not None:
        return done.model_copy(update={"reused": True})
    outputs, counts = await compute()
    refs = {}
    for name, rows in outputs.items():
        # "problems/00003": the 4th chunk of dataset "problems" written by this chunk
        dataset, _, part = name.partition("/")
        if rows:
            key = f"{spec.stage}-{spec.key}" + (f"-{part}" if part else "")
            refs[name] = store.dataset(dataset).write_chunk(key, rows)
    out = StageOutput(stage=spec.stage, key=spec.key, refs=refs, counts=dict(counts))
    store.write_bytes(manifest, out.model_dump_json(indent=1).encode())
    return out


async def map_rows(
    items: Iterable[T], fn: Callable[[T], Awaitable[R]], concurrency: int
) -> list[R]:
    """``fn`` over ``items`` with at most ``concurrency`` in flight; results in order.

    ``concurrency`` workers take the rows in turn (no task per row waiting on a
    semaphore). Every row runs to its end even when another fails: the first
    exception, in row order, is raised only after all rows are done, so finished work
    reaches the call cache.

    >>> async def double(x: int) -> int:
    ...     return 2 * x
    >>> asyncio.run(map_rows(range(5), double, 2))
    [0, 2, 4, 6, 8]
    """
    rows = list(items)
    results: list[Any] = [None] * len(rows)
    failed: list[BaseException | None] = [None] * len(rows)
    order = iter(range(len(rows)))

    async def worker() -> None:
        for i in order:
            try:
                results[i] = await fn(rows[i])
            except Exception as e:
                failed[i] = e

    n = max(1, min(concurrency, len(rows)))
    ends = await asyncio.gather(*(worker() for _ in range(n)), return_exceptions=True)
    for error in (*failed, *ends):
        if isinstance(error, BaseException):
            raise error
    return results


def split_rows(dataset: str, rows: Sequence[Record], size: int) -> dict[str, Sequence[Record]]:
    """Rows cut into output chunks of ``size`` for :func:`run_chunk`:
    ``{"<dataset>/00000": rows[:size], ...}``.

    >>> list(split_rows("problems", [], 2))
    []
    """
    return {f"{dataset}/{i // size:05d}": rows[i : i + size] for i in range(0, len(rows), size)}


def drop(stage: str, reason: str, row: Record, target_id: str, detail: str = "") -> Dropped:
    """A side-output record for ``row``, which ``stage`` did not pass on."""
    return Dropped(
        stage=stage,
        reason=reason,
        detail=detail,
        target_id=target_id,
        record_type=type(row).__name__,
        record=row.model_dump(mode="json"),
    )


def raise_if_transient(stage: str, key: str, errors: Sequence[ErrorInfo], total: int) -> None:
    """Raise :class:`IncompleteChunk` when any row failed for a reason worth retrying."""
    transient = [e for e in errors if e.transient]
    if transient:
        first = transient[0]
        raise IncompleteChunk(
            f"stage {stage}, chunk {key}: {len(transient)} of {total} rows failed "
            f"({first.kind}: {first.message}); finished calls are cached, re-run to resume"
        )
