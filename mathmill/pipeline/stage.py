"""A stage is a declared object: its name, parameter model, the roles it calls, its
prompt templates, the datasets it reads and writes, and one ``async`` function over a
chunk. The kit derives the rest from the declaration: the code the stage depends on
(:func:`stage_code`), the chunk spec and cache key, the Prefect task, resume and
idempotent output (:func:`execute`).

>>> from pydantic import BaseModel
>>> class Double(BaseModel):
...     factor: int = 2
>>> @stage("double", params=Double, kind="source", outputs={"numbers": Problem})
... async def double(chunk: Chunk, params: Double) -> StageResult:
...     return StageResult()
>>> double.name, double.kind, double.roles
('double', 'source', ())
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from mathmill import __version__
from mathmill.pipeline.chunks import (
    ChunkSpec,
    Runtime,
    StageOutput,
    chunk_cache_key,
    current_runtime,
    raise_if_transient,
    run_chunk,
)
from mathmill.records import Dropped, ErrorInfo, Problem, Record
from mathmill.storage import ChunkRef

__all__ = [
    "Chunk",
    "Stage",
    "StageKind",
    "StageResult",
    "execute",
    "stage",
    "stage_code",
]

P = TypeVar("P", bound=BaseModel)
StageKind = Literal["source", "chunks", "whole"]
"""``source``: one chunk, no inputs (topics, load). ``chunks``: one chunk per chunk of
its first input, the other inputs' chunk of the same index beside it (row-level and
fan-out stages). ``whole``: one chunk over every chunk of its inputs (dedup, splits,
selection)."""

# Packages whose code does not change what a stage writes (plumbing: clients, the
# sandbox, storage, the kit's runner, Prefect glue). A stage's cache key follows the
# code it imports everywhere else: its own module, grading, records, sources, ...
_PLUMBING = (
    "mathmill.llm",
    "mathmill.sandbox",
    "mathmill.storage",
    "mathmill.blocks",
    "mathmill.flows",
    "mathmill.pipeline",
    "mathmill.errors",
    "mathmill.codec",
    "mathmill.cli",
    "mathmill.local_server",
    "mathmill.prefect_server",
    "mathmill._lazy",
    "mathmill.sidecar",
)


@dataclass
class StageResult:
    """What a stage's function returns for one chunk.

    ``rows``: dataset name -> rows written (``"problems/00003"`` names the 4th output
    chunk of dataset ``problems``: see :func:`~mathmill.pipeline.chunks.split_rows`).
    ``dropped``: rows not passed on, each with its reason. ``counts``: typed counters,
    ``"<stage>.<outcome>" -> n``. ``errors``: per-row failures; a transient one (endpoint
    down, timeout) leaves the chunk incomplete, so a re-run redoes only what failed.
    ``attempted``: rows tried, for the incomplete-chunk message.
    """

    rows: dict[str, Sequence[Record]] = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    errors: Sequence[ErrorInfo] = ()
    attempted: int | None = None


@dataclass
class Chunk:
    """One chunk's inputs and the run's resources, as the stage function sees them."""

    spec: ChunkSpec
    rt: Runtime
    inputs: dict[str, list[Any]]

    def rows(self, dataset: str) -> list[Any]:
        """The input rows of ``dataset`` (empty when the upstream chunk wrote none)."""
        return self.inputs.get(dataset, [])

    @property
    def index(self) -> int:
        """The chunk's index within its stage."""
        return self.spec.index

    @property
    def extra(self) -> dict[str, Any]:
        """The chunk's spec config besides the stage params (a slice, a sample seed)."""
        return {k: v for k, v in self.spec.config.items() if k not in ("stage", "endpoints")}


StageFn = Callable[[Chunk, P], Awaitable[StageResult]]


@dataclass(eq=False)
class Stage(Generic[P]):
    """A declared stage (see :func:`stage`)."""

    name: str
    fn: StageFn[P]
    params: type[P]
    kind: StageKind = "chunks"
    roles: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    inputs: Mapping[str, type[Record]] = field(default_factory=dict)
    outputs: Mapping[str, type[Record]] = field(default_factory=dict)
    description: str = ""
    extra_code: tuple[str, ...] = ()
    warm: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind != "source" and not self.inputs:
            raise ValueError(f"stage {self.name}: a {self.kind!r} stage needs inputs")
        if self.kind == "source" and self.inputs:
            raise ValueError(f"stage {self.name}: a source stage reads no inputs")

    @functools.cached_property
    def code(self) -> str:
        """SHA-256 over the mathmill version, the source of the module that declares the
        stage, and the code its function uses: the mathmill modules of the functions,
        classes and modules it refers to, with everything they import (see
        :func:`stage_code`). Editing one stage's code leaves the others' keys alone.
        Computed once per process (every chunk's spec carries it).
        """
        return _function_code(self.fn, self.extra_code)

    @functools.cached_property
    def task(self) -> Any:
        """The stage's Prefect task: one task run per chunk, cached on the chunk spec."""
        from prefect import task

        async def run_stage_chunk(spec: ChunkSpec, params: BaseModel) -> StageOutput:
            return await execute(self, spec, params)

        run_stage_chunk.__qualname__ = run_stage_chunk.__name__ = f"stage_{self.name}"
        run_stage_chunk.__doc__ = self.description
        # the spec names the stage (generation chunks carry their calling stage's name)
        name = "{spec.stage}" if self.kind != "chunks" else "{spec.stage}-{spec.index}"
        return task(
            name=self.name,
            task_run_name=name,
            cache_key_fn=chunk_cache_key,
            persist_result=True,
        )(run_stage_chunk)

    def role_names(self, rt: Runtime) -> list[str]:
        """The runtime's roles this stage calls: its declared roles, where ``"rung.*"``
        stands for every role named ``rung.<something>`` (a configurable list of models).
        """
        known = set(rt.endpoints) | set(rt.backends)
        names: list[str] = []
        for role in self.roles:
            if role.endswith("*"):
                names += sorted(n for n in known if n.startswith(role[:-1]))
            elif role in known:
                names.append(role)
        return names

    def spec(
        self,
        rt: Runtime,
        params: P,
        index: int,
        inputs: Sequence[ChunkRef],
        **extra: Any,
    ) -> ChunkSpec:
        """The chunk spec: inputs, params, the roles' endpoint identities, prompt hashes,
        code, run directory; its hash is the chunk's cache key.
        """
        from mathmill.pipeline.chunks import prompt_hashes

        endpoints = {r: rt.identity(r) for r in self.role_names(rt)}
        return ChunkSpec(
            stage=self.name,
            index=index,
            inputs=list(inputs),
            config={"stage": params.model_dump(mode="json"), "endpoints": endpoints, **extra},
            prompts=prompt_hashes(*self.prompts),
            code=self.code,
            store_url=rt.store.url,
        )


def stage(
    name: str,
    *,
    params: type[P],
    kind: StageKind = "chunks",
    roles: Sequence[str] = (),
    prompts: Sequence[str] = (),
    inputs: Mapping[str, type[Record]] | None = None,
    outputs: Mapping[str, type[Record]] | None = None,
    code: Sequence[str] = (),
    warm: Sequence[str] = (),
) -> Callable[[StageFn[P]], Stage[P]]:
    """Declare a stage: decorate its ``async def fn(chunk, params) -> StageResult``.

    ``inputs`` and ``outputs`` map dataset names to record types, in order (the first
    input decides the chunking of a ``chunks`` stage). ``roles`` are the LLM roles it
    calls (their endpoints are in its cache key), ``prompts`` the template ids it
    renders (their hashes too). ``code``: modules whose source joins the cache key
    besides those found from the stage's imports (plumbing that decides rows, such as
    the vLLM engine's request mapping). ``warm``: modules the stage's side work imports
    in the helper process (:mod:`mathmill.sidecar`), imported there when the run starts.
    """

    def declare(fn: StageFn[P]) -> Stage[P]:
        return Stage(
            name=name,
            fn=fn,
            params=params,
            kind=kind,
            roles=tuple(roles),
            prompts=tuple(prompts),
            inputs=dict(inputs or {}),
            outputs=dict(outputs or {}),
            description=(fn.__doc__ or "").strip().split("\n\n")[0],
            extra_code=tuple(code),
            warm=tuple(warm),
        )

    return declare


async def execute(stage_: Stage[Any], spec: ChunkSpec, params: BaseModel) -> StageOutput:
    """Run one chunk of ``stage_`` once: reuse its output if complete in the run
    directory, else read its inputs (the rows of ``spec.config['slice']`` only, when
    set), call the stage function and write its outputs and completion manifest.
    """
    rt = current_runtime()

    async def compute() -> tuple[dict[str, Sequence[Record]], Counter[str]]:
        chunk = Chunk(spec=spec, rt=rt, inputs=_read_inputs(stage_, spec, rt))
        got = await stage_.fn(chunk, params)
        attempted = got.attempted
        if attempted is None:
            attempted = sum(len(v) for v in chunk.inputs.values()) or len(got.errors)
        raise_if_transient(spec.stage, spec.key, got.errors, attempted)
        outputs = dict(got.rows)
        if got.dropped:
            outputs["dropped"] = got.dropped
        return outputs, got.counts

    return await run_chunk(spec, compute)


def _read_inputs(stage_: Stage[Any], spec: ChunkSpec, rt: Runtime) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {}
    for ref in spec.inputs:
        model = stage_.inputs.get(ref.dataset, Problem)
        rows.setdefault(ref.dataset, []).extend(
            rt.store.dataset(ref.dataset).read_chunk(ref, model)
        )
    if (cut := spec.config.get("slice")) is not None:
        first = next(iter(stage_.inputs))
        rows[first] = rows.get(first, [])[cut[0] : cut[1]]
    return rows


# -- the code a stage depends on ------------------------------------------------------


@functools.cache
def stage_code(module: str, *extra: str) -> str:
    """SHA-256 over the mathmill version and the source files of ``module`` and every
    mathmill module it imports, at any depth (found by reading the import statements,
    not by importing), plumbing packages excepted: a stage's cache key changes when the
    code that decides its rows does.
    """
    return _digest(frozenset(_closure(module) | set(extra)))


@functools.cache
def _digest(modules: frozenset[str]) -> str:
    """SHA-256 over the mathmill version and the named modules' sources."""
    digest = hashlib.sha256(__version__.encode())
    for name in sorted(modules):
        digest.update(name.encode())
        digest.update(_source(name))
    return digest.hexdigest()


def _function_code(fn: Callable[..., Any], extra: tuple[str, ...]) -> str:
    used = [_closure(m) for m in _referenced_modules(fn)]
    return _digest(frozenset({fn.__module__, *extra}.union(*used)))


def _referenced_modules(fn: Callable[..., Any]) -> set[str]:
    """The mathmill modules of the globals ``fn`` (and its nested functions) names."""
    found: set[str] = set()
    namespace = getattr(fn, "__globals__", {})
    todo = [fn.__code__]
    while todo:
        code = todo.pop()
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for name in code.co_names:
            obj = namespace.get(name)
            module = obj.__name__ if isinstance(obj, types.ModuleType) else None
            module = module or getattr(obj, "__module__", None)
            if isinstance(module, str) and module.split(".")[0] == "mathmill":
                found.add(module)
    return found


@functools.cache
def _closure(module: str) -> frozenset[str]:
    """``module`` and the mathmill modules it imports, at any depth, but plumbing."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or _is_plumbing(name) or _origin(name) is None:
            continue
        seen.add(name)
        todo.extend(_imports(name))
    _save_import_cache()
    return frozenset(seen)


def _is_plumbing(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _PLUMBING)


_ROOT = Path(__file__).resolve().parents[1]  # the mathmill package


@functools.cache
def _origin(name: str) -> Path | None:
    """The source file of mathmill module ``name`` (None: not a mathmill module)."""
    parts = name.split(".")
    if parts[0] != "mathmill":  # a stage declared elsewhere (a plugin, a test): its file
        file = getattr(sys.modules.get(name), "__file__", None)
        return Path(file) if file and file.endswith(".py") else None
    base = _ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if len(parts) > 1 and candidate.is_file():
            return candidate
    return _ROOT / "__init__.py" if len(parts) == 1 else None


def _source(name: str) -> bytes:
    origin = _origin(name)
    return origin.read_bytes() if origin else b""


def _imports(name: str) -> list[str]:
    """The mathmill modules ``name``'s source imports (``from a import b`` counts ``a.b``
    when that is a module). Parsing is most of a stage key's cost (~0.15 s for a
    pipeline's ~20 modules), so what a source imports is kept on disk by the hash of
    its name and text (:func:`_import_cache`): an edited file is parsed again.
    """
    origin = _origin(name)
    if origin is None:
        return []
    source = origin.read_bytes()
    key = hashlib.sha256(name.encode() + b"\0" + source).hexdigest()
    cache = _import_cache()
    if (hit := cache.get(key)) is not None:
        return list(hit)
    package = name if origin.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names]
    found = [m for m in found if m.split(".")[0] == "mathmill"]
    cache[key] = found
    _unsaved.add(key)
    return found


_IMPORT_CACHE_ENTRIES = 4000
_unsaved: set[str] = set()  # keys parsed in this process, not yet written


def _import_cache_path() -> Path:
    base = os.environ.get("MATHMILL_CACHE_DIR") or os.path.join(Path.home(), ".cache", "mathmill")
    return Path(base) / "stage-imports-v1.json"


@functools.cache
def _import_cache() -> dict[str, list[str]]:
    """What each module source imports, by :func:`_imports`'s key: read once per
    process from ``$MATHMILL_CACHE_DIR/stage-imports-v1.json`` (empty when missing or
    unreadable).
    """
    try:
        data = json.loads(_import_cache_path().read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list)}


def _save_import_cache() -> None:
    """Write the cache (the newest entries) atomically when this process parsed
    anything new; a read-only home is no error.
    """
    if not _unsaved:
        return
    _unsaved.clear()
    path = _import_cache_path()
    entries = dict(list(_import_cache().items())[-_IMPORT_CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        pass


_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every statement of ``tree`` (at any depth: in functions, classes, branches,
    handlers) but those under ``if TYPE_CHECKING:`` (imports for the type checker only:
    not code that runs). Expressions are not visited: no statement, so no import, is
    inside one, and they are most of a module's nodes.
    """
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        for name in _BODIES:
            children = getattr(node, name, None)
            if isinstance(children, list):
                todo += children
    return nodes
