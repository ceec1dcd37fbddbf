"""Batch generation for pipelines: :class:`GenRequest` rows in, :class:`Generation` rows
out, on one of three backends chosen by :class:`GenBackend`:

* ``endpoint``: an OpenAI-compatible server through the role's client (a vLLM OpenAI
  server gets its extras: prompt logprobs, token ids, guided JSON);
* ``deployment``: chunks dispatched to the ``generate`` deployment on the ``vllm`` work
  pool with ``run_deployment`` (one flow run per group of chunks; the engine is
  loaded once per flow run and reused across its chunks);
* ``engine``: the offline vLLM engine in this process (a GPU on this machine).

Requests are written as chunks to the run directory first; each chunk's output is keyed
by the hash of its requests, the backend's identity and this code, and written with a
completion file, so a re-run (or another backend with the same identity) dispatches
only the chunks not yet done.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mathmill.errors import ConfigError
from mathmill.llm.client import ChatResult, LLMClient
from mathmill.llm.client import TokenLogprob as ClientLogprob
from mathmill.llm.vllm_engine import EngineConfig, get_engine
from mathmill.pipeline.chunks import (
    ChunkSpec,
    IncompleteChunk,
    Runtime,
    _finished,
    fingerprint,
    map_rows,
)
from mathmill.pipeline.remote import require_server, run_and_wait
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.records import (
    ErrorInfo,
    GenChoice,
    Generation,
    GenRequest,
    SamplingParams,
    TokenLogprob,
)
from mathmill.storage import ChunkRef, RunStore

__all__ = [
    "GenBackend",
    "dispatch",
    "endpoint_generate",
    "engine_generate",
    "generate",
    "generate_rows",
    "generation_specs",
    "place_roles",
    "read_generations",
    "role_model",
    "write_requests",
]

BackendKind = Literal["endpoint", "deployment", "engine"]


class GenBackend(BaseModel):
    """Where a pipeline's batch generation runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: BackendKind = Field(
        "endpoint",
        description="'endpoint': the role's OpenAI-compatible server; 'deployment': the "
        "generate flow on the vllm work pool; 'engine': vLLM in this process.",
    )
    engine: EngineConfig | None = Field(
        None, description="The model to load (deployment and engine backends)."
    )
    deployment: str = Field(
        "generate/generate", description="The generate deployment ('flow/deployment')."
    )
    chunk_size: int = Field(256, ge=1, le=100_000, description="Requests per chunk.")
    runs: int = Field(
        1,
        ge=1,
        le=1024,
        description="generate flow runs at once (about one per GPU worker); pending "
        "chunks are shared out among them.",
    )
    run_timeout_s: float | None = Field(
        None, gt=0, description="Give up on a flow run not finished after this long."
    )
    warn_after_s: float = Field(
        60.0, gt=0, description="Warn when no worker has picked a run up after this long."
    )

    @model_validator(mode="after")
    def _needs_engine(self) -> GenBackend:
        if self.kind != "endpoint" and self.engine is None:
            raise ValueError(f"backend kind {self.kind!r} needs engine (the model to load)")
        return self


def place_roles(
    generators: Mapping[str, tuple[Any, GenBackend]],
) -> tuple[dict[str, Any], dict[str, GenBackend]]:
    """Roles that generate, each given as ``(its endpoint model, its backend)``, split
    as a run opens them: ``(roles, backends)``, a role on the endpoint backend among the
    endpoint roles, any other among the vLLM backends.
    """
    roles: dict[str, Any] = {}
    backends: dict[str, GenBackend] = {}
    for role, (model, backend) in generators.items():
        if backend.kind == "endpoint":
            roles[role] = model
        else:
            backends[role] = backend
    return roles, backends


def write_requests(
    store: RunStore, stage: str, requests: Sequence[GenRequest], size: int
) -> list[ChunkRef]:
    """Write ``requests`` as chunks of ``size`` into the run's ``requests`` dataset (a
    chunk's key holds the hash of its rows, so the same requests map to the same chunk).
    """
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{stage}: request ids must be unique")
    refs = []
    for i in range(0, len(requests), size):
        part = requests[i : i + size]
        digest = fingerprint([r.model_dump(mode="json") for r in part])[:16]
        key = f"{stage}-{i // size:05d}-{digest}"
        refs.append(store.dataset("requests").write_chunk(key, part))
    return refs


def generation_specs(
    rt: Runtime, stage: str, refs: Sequence[ChunkRef], identity: dict[str, Any]
) -> list[ChunkSpec]:
    """One chunk spec per request chunk: the cache key of its generations (the
    requests' hash, the backend's identity, the engine stage's code).
    """
    code = engine_generate.code
    return [
        ChunkSpec(
            stage=stage,
            index=i,
            inputs=[ref],
            config={"backend": identity},
            code=code,
            store_url=rt.store.url,
        )
        for i, ref in enumerate(refs)
    ]


def read_generations(store: RunStore, specs: Sequence[ChunkSpec]) -> list[Generation]:
    """Every chunk's generations, in request order; a chunk not complete is an error."""
    out: list[Generation] = []
    for spec in specs:
        done = _finished(store, spec)
        if done is None:
            raise IncompleteChunk(
                f"stage {spec.stage}, chunk {spec.key}: no generations in {store.url}; "
                "re-run to resume"
            )
        ref = done.refs.get("generations")
        if ref is not None:
            out.extend(store.dataset("generations").read_chunk(ref, Generation))
    return out


def _counts(stage: str, gens: Sequence[Generation]) -> Counter[str]:
    counts: Counter[str] = Counter()
    counts[f"{stage}.requests"] = len(gens)
    counts[f"{stage}.samples"] = sum(len(g.choices) for g in gens)
    counts[f"{stage}.errors"] = sum(g.error is not None for g in gens)
    counts[f"{stage}.prompt_tokens"] = sum(g.usage.prompt_tokens for g in gens)
    counts[f"{stage}.completion_tokens"] = sum(g.usage.completion_tokens for g in gens)
    return counts


# -- the engine backend (in a generate flow run, or in the pipeline's process) -------


@stage(
    "generate",
    params=EngineConfig,
    inputs={"requests": GenRequest},
    outputs={"generations": Generation},
    code=("mathmill.llm.vllm_engine",),
)
async def engine_generate(chunk: Chunk, engine: EngineConfig) -> StageResult:
    """One chunk of requests through the process's vLLM engine (loaded on first use)."""
    requests: list[GenRequest] = chunk.rows("requests")
    started = time.perf_counter()
    # Off the event loop: loading and generating block for a long time.
    llm = await asyncio.to_thread(get_engine, engine)
    gens = await asyncio.to_thread(llm.generate, requests)
    counts = _counts(chunk.spec.stage, gens)
    counts[f"{chunk.spec.stage}.engine_ms"] = int((time.perf_counter() - started) * 1000)
    return StageResult(rows={"generations": gens}, counts=counts)


# -- the endpoint backend --------------------------------------------------------------


def _records(tokens: Sequence[ClientLogprob] | None) -> list[TokenLogprob] | None:
    """The client's token logprobs as records."""
    if tokens is None:
        return None
    return [
        TokenLogprob(token=t.token, token_id=t.token_id, logprob=t.logprob, top=t.top)
        for t in tokens
    ]


def _merge_choices(into: ChatResult, more: ChatResult) -> None:
    """Append ``more``'s samples to ``into`` (renumbered), counting its costs."""
    start = len(into.choices)
    for i, c in enumerate(more.choices):
        c.index = start + i
        into.choices.append(c)
    into.add_costs(more)


def _single_choice_tokens(result: ChatResult, index: int) -> dict[int, int]:
    """A call's completion tokens are its choice's when it has one choice."""
    return {index: result.usage.completion_tokens} if len(result.choices) == 1 else {}


def _generation(request: GenRequest, result: ChatResult, known: dict[int, int]) -> Generation:
    """``known``: tokens by choice index where the response said (one choice per call);
    elsewhere a choice's tokens are counted from its logprobs, or unknown (0).
    """
    choices = []
    for i, c in enumerate(result.choices):
        logprobs = _records(c.logprobs)
        tokens = len(logprobs) if logprobs is not None else known.get(i, 0)
        choices.append(
            GenChoice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                tokens=tokens,
                cumulative_logprob=sum(t.logprob for t in logprobs) if logprobs else None,
                logprobs=logprobs,
            )
        )
    return Generation(
        id=request.id,
        model=result.model,
        backend="http",
        choices=choices,
        prompt_logprobs=_records(result.prompt_logprobs),
        usage=result.usage,
        latency_ms=result.latency_ms,
        error=result.error,
        metadata=request.metadata,
    )


async def endpoint_generate(
    client: LLMClient, requests: Sequence[GenRequest], stage: str, concurrency: int
) -> list[Generation]:
    """Each request as one HTTP call (``n`` samples in it). Prompt logprobs and token ids
    are asked for in vLLM's extra fields, a schema as ``response_format`` (chat) or
    vLLM's ``structured_outputs`` (completions). A server without these extras answers
    400: that request's row records the error.
    """

    async def one(r: GenRequest) -> Generation:
        extra_body: dict[str, Any] = dict(client.endpoint.extra_body)
        extra: dict[str, Any] = {}
        if r.prompt_logprobs is not None:
            extra_body |= {"prompt_logprobs": r.prompt_logprobs, "return_token_ids": True}
        if r.json_schema is not None:
            if r.messages is not None:
                schema = {"name": "reply", "schema": r.json_schema, "strict": True}
                extra["response_format"] = {"type": "json_schema", "json_schema": schema}
            else:
                extra_body["structured_outputs"] = {"json": r.json_schema}
        if extra_body:
            extra["extra_body"] = extra_body
        common: dict[str, Any] = {"stage": stage, "raise_on_error": False}
        result = await call(r, r.sampling, r.id, common, extra)
        known = _single_choice_tokens(result, 0)
        # Some servers (llama.cpp) answer one choice whatever n is: ask again for the
        # rest, each time with its own cache salt (and seed), so samples differ.
        for k in range(1, r.sampling.n):
            missing = r.sampling.n - len(result.choices)
            if not result.ok or missing <= 0:
                break
            seed = None if r.sampling.seed is None else r.sampling.seed + k
            more = r.sampling.model_copy(update={"n": missing, "seed": seed})
            extra_call = await call(r, more, f"{r.id}:{k}", common, extra)
            if not extra_call.ok:
                result.error = extra_call.error
                break
            known |= _single_choice_tokens(extra_call, len(result.choices))
            _merge_choices(result, extra_call)
        return _generation(r, result, known)

    async def call(
        r: GenRequest,
        sampling: SamplingParams,
        salt: str,
        common: dict[str, Any],
        extra: dict[str, Any],
    ) -> ChatResult:
        kwargs = common | {"sampling": sampling, "cache_salt": salt} | extra
        if r.messages is not None:
            return await client.chat(r.messages, **kwargs)
        return await client.complete(r.prompt or "", **kwargs)

    return await map_rows(requests, one, concurrency)


def role_model(rt: Runtime, role: str) -> str:
    """The model name ``role`` generates with (its engine's, or its endpoint's)."""
    backend = rt.backends.get(role)
    if backend is not None and backend.kind != "endpoint" and backend.engine is not None:
        return backend.engine.model
    endpoint = rt.endpoints.get(role)
    return endpoint.model if endpoint is not None else ""


def _with_results(storage: Any, task_: Any) -> Any:
    """``task_`` with its results where the pipeline's storage fields say (if any)."""
    return task_ if storage is None else storage.with_results(task_)


async def generate(
    rt: Runtime, role: str, requests: Sequence[GenRequest], *, stage: str
) -> list[Generation]:
    """The one generation interface of every LLM stage: ``requests`` answered by
    ``role``'s backend, in request order. ``endpoint`` (the default): the role's
    OpenAI-compatible server (the embedded model, a vLLM server, an API), one call per
    request, ``rt.row_concurrency`` in flight, finished calls in the call cache.
    ``engine``: vLLM in this process, the requests as one batch. ``deployment``: the
    requests written as chunks and shared out among flow runs of the ``generate``
    deployment on the vllm pool (:func:`generate_rows`). A request that fails has its
    error on its row.
    """
    backend = rt.backends.get(role)
    if backend is None or backend.kind == "endpoint":
        return await endpoint_generate(rt.client(role), requests, stage, rt.row_concurrency)
    if backend.kind == "engine":
        assert backend.engine is not None
        meter = rt.pool.meter
        if (spent := meter.budget_reached()) is not None:  # checked before each batch
            why = ErrorInfo(kind="budget", message=f"{stage}: {spent}", stage=stage, attempts=0)
            model = backend.engine.model
            return [Generation(id=r.id, model=model, backend="vllm", error=why) for r in requests]
        llm = await asyncio.to_thread(get_engine, backend.engine)
        started = time.perf_counter()
        gens: list[Generation] = await asyncio.to_thread(llm.generate, list(requests))
        took = time.perf_counter() - started
        meter.record_gpu(stage, took)
        for g in gens:  # one call per request, as on an endpoint
            u = g.usage
            meter.record(
                stage,
                model=g.model,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                latency_ms=took * 1000.0,
                error=g.error is not None,
            )
        return gens
    params = rt.params
    return await generate_rows(
        rt,
        requests,
        backend,
        stage=stage,
        storage=params,
        out=getattr(params, "out", None),
    )


_STORAGE_FIELDS = ("storage_endpoint_url", "storage_block", "results_block")


def _dump(specs: Sequence[ChunkSpec]) -> list[dict[str, Any]]:
    return [s.model_dump(mode="json") for s in specs]


async def dispatch(
    store: RunStore,
    specs: Sequence[ChunkSpec],
    backend: GenBackend,
    storage: Any,
    out: str,
) -> int:
    """Send the chunks not yet done to ``backend.runs`` generate flow runs and wait for
    them all (a failed run does not stop the others). Returns how many chunks were sent.
    The runs' usage (tokens, engine seconds) joins the current run's meter; none is sent
    once its budget is spent.
    """
    import json

    from mathmill.errors import FlowRunFailed, MathmillError
    from mathmill.llm.usage import UsageMeter
    from mathmill.pipeline.chunks import current_runtime
    from mathmill.pipeline.fanout import usage_path

    assert backend.engine is not None
    pending = [s for s in specs if _finished(store, s) is None]
    if not pending:
        return 0
    try:
        meter: UsageMeter | None = current_runtime().pool.meter
    except MathmillError:  # called outside a run
        meter = None
    if meter is not None and (spent := meter.budget_reached()) is not None:
        raise IncompleteChunk(f"{len(pending)} generation chunks not sent: {spent}")
    require_server("the deployment backend", "vllm")
    groups = [pending[i :: backend.runs] for i in range(min(backend.runs, len(pending)))]
    fields = storage.model_dump(include=set(_STORAGE_FIELDS)) if storage is not None else {}
    engine = backend.engine.model_dump(mode="json")
    runs = [
        run_and_wait(
            backend.deployment,
            {"params": {"out": out, "specs": _dump(group), "engine": engine, **fields}},
            kind="generate",
            pool="vllm",
            run_timeout_s=backend.run_timeout_s,
            warn_after_s=backend.warn_after_s,
        )
        for group in groups
    ]
    results = await asyncio.gather(*runs, return_exceptions=True)
    for result in results:  # each run recorded its usage in the run directory, failed too
        flow_run_id = result.flow_run_id if isinstance(result, FlowRunFailed) else result
        path = usage_path(str(flow_run_id))
        if meter is not None and isinstance(flow_run_id, str) and store.exists(path):
            meter.merge(UsageMeter.from_summary(json.loads(store.read_bytes(path))))
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise failures[0]
    return len(pending)


async def generate_rows(
    rt: Runtime,
    requests: Sequence[GenRequest],
    backend: GenBackend,
    *,
    stage: str = "generate",
    storage: Any = None,
    out: str | None = None,
) -> list[Generation]:
    """Generate ``requests`` on the ``generate`` deployment (``backend.kind`` is
    ``deployment``); results in request order. The requests are written as chunks of
    ``backend.chunk_size``; the chunks not yet done are shared out among
    ``backend.runs`` flow runs.

    ``storage`` and ``out`` (the pipeline's own parameters: its ``StorageFields``) tell
    deployment runs, which may be on other machines, where the run directory is.
    """
    assert backend.kind == "deployment"
    assert backend.engine is not None
    refs = write_requests(rt.store, stage, requests, backend.chunk_size)
    specs = generation_specs(rt, stage, refs, {"engine": backend.engine.identity()})
    # Inside a storage block `out` is the path the worker resolves through the block;
    # otherwise the worker gets the absolute URL (its cwd differs).
    block = getattr(storage, "storage_block", None)
    where = out if out is not None and block else rt.store.url
    await dispatch(rt.store, specs, backend, storage, where)
    return read_generations(rt.store, specs)
