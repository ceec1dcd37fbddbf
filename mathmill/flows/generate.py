"""The ``generate`` flow (GPU inference on the ``vllm`` work pool) and the dispatcher
pipelines call to use it, or an HTTP endpoint, or vLLM in their own process.

A pipeline calls :func:`generate_rows` with its requests. With the ``deployment``
backend the request chunks not yet done are shared out among ``backend.runs`` flow
runs of the ``generate`` deployment (``run_deployment``); each run loads the engine
once and works through its chunks, writing each chunk's generations next to the
pipeline's other outputs, so a re-run dispatches only what is missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from prefect import flow, get_run_logger
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import ConfigError
from mathmill.flows.options import StorageFields
from mathmill.llm.client import LLMPool
from mathmill.llm.vllm_engine import EngineConfig, get_engine
from mathmill.records import Generation, GenRequest
from mathmill.storage import RunStore
from mathmill.tasks.generation import (
    GenBackend,
    endpoint_task,
    engine_task,
    generation_specs,
    read_generations,
    write_requests,
)
from mathmill.tasks.runtime import (
    ChunkSpec,
    IncompleteChunk,
    Runtime,
    StageOutput,
    _finished,
    use_runtime,
)

__all__ = ["GenerateParams", "GenerateResult", "dispatch", "generate", "generate_rows"]

log = logging.getLogger("mathmill.flows.generate")


class GenerateParams(StorageFields):
    """Parameters of one ``generate`` flow run: which request chunks of which run
    directory, and the model. Pipelines fill them in; a person rarely does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(description="The calling pipeline's run directory (as it gave it).")
    specs: list[ChunkSpec] = Field(description="The request chunks to generate, in order.")
    engine: EngineConfig = Field(description="The model to load into vLLM.")


class GenerateResult(BaseModel):
    """What one generate flow run did."""

    chunks: int = 0
    reused: int = 0
    requests: int = 0
    samples: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_load_s: float | None = None
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time (engine load included)."""
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0


@flow(name="generate", validate_parameters=True, log_prints=False)
async def generate(params: GenerateParams) -> GenerateResult:
    """Chunks of prompts in, chunks of completions with usage out, on vLLM's engine
    (loaded once for the whole run)."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = RunStore(await params.storage_config(params.out))
    rt = Runtime(store=store, pool=LLMPool(), endpoints={})
    result = GenerateResult(chunks=len(params.specs))
    task = params.with_results(engine_task)
    with use_runtime(rt):
        for spec in params.specs:
            if spec.store_url != store.url:
                raise ConfigError(
                    f"chunk {spec.key} belongs to {spec.store_url}, not to {store.url}: "
                    "out and storage_block must name the caller's run directory"
                )
            out: StageOutput = await task(spec, params.engine)
            if result.engine_load_s is None and not out.reused:
                result.engine_load_s = get_engine(params.engine).load_s
            _add(result, spec.stage, out)
            logger.info(
                "chunk %s: %s requests, %s completion tokens%s",
                spec.key,
                out.counts.get(f"{spec.stage}.requests", 0),
                out.counts.get(f"{spec.stage}.completion_tokens", 0),
                " (done before)" if out.reused else "",
            )
    result.wall_s = time.perf_counter() - started
    logger.info(
        "generate: %d chunks (%d done before), %d samples, %d completion tokens, %.1f tok/s",
        result.chunks,
        result.reused,
        result.samples,
        result.completion_tokens,
        result.tokens_per_s,
    )
    return result


def _add(result: GenerateResult, stage: str, out: StageOutput) -> None:
    c = out.counts
    result.reused += int(out.reused)
    result.requests += c.get(f"{stage}.requests", 0)
    result.samples += c.get(f"{stage}.samples", 0)
    result.errors += c.get(f"{stage}.errors", 0)
    result.prompt_tokens += c.get(f"{stage}.prompt_tokens", 0)
    result.completion_tokens += c.get(f"{stage}.completion_tokens", 0)


async def _run_and_wait(backend: GenBackend, params: GenerateParams) -> None:
    """Start one generate flow run and wait for it; raise unless it completes."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import arun_deployment

    try:
        run = await arun_deployment(
            backend.deployment,
            parameters={"params": params.model_dump(mode="json")},
            timeout=0,
            tags=["mathmill", "generate"],
        )
    except ObjectNotFound as e:
        raise ConfigError(
            f"no deployment {backend.deployment!r} on the Prefect server: `mathmill server "
            "up` deploys it, or set backend.deployment"
        ) from e
    what = f"generate flow run {run.name!r} ({run.id})"
    started = time.monotonic()
    warned = False
    async with get_client() as client:
        while True:
            state = (await client.read_flow_run(run.id)).state
            if state is not None and state.is_final():
                break
            waited = time.monotonic() - started
            if not warned and waited > backend.warn_after_s and state and state.is_scheduled():
                warned = True
                log.warning(
                    "%s: no worker has picked it up after %.0fs; is one running? "
                    "`prefect worker start --pool vllm --type process`",
                    what,
                    waited,
                )
            if backend.run_timeout_s is not None and waited > backend.run_timeout_s:
                raise IncompleteChunk(
                    f"{what} not finished after {backend.run_timeout_s:g}s "
                    f"(state {state.name if state else 'unknown'}); chunks it finished are "
                    "kept, re-run to resume"
                )
            await asyncio.sleep(1.0)
    if not state.is_completed():
        raise IncompleteChunk(
            f"{what} ended {state.name}: {state.message or ''}; chunks it finished are kept, "
            "re-run to resume"
        )


async def dispatch(
    store: RunStore,
    specs: Sequence[ChunkSpec],
    backend: GenBackend,
    storage: StorageFields,
    out: str,
) -> int:
    """Send the chunks not yet done to ``backend.runs`` generate flow runs and wait for
    them all (a failed run does not stop the others). Returns how many chunks were sent.
    """
    from prefect.settings import PREFECT_API_URL

    assert backend.engine is not None
    pending = [s for s in specs if _finished(store, s) is None]
    if not pending:
        return 0
    if not PREFECT_API_URL.value():
        raise ConfigError(
            "the deployment backend needs a Prefect server with workers on the vllm pool: "
            "run `mathmill server up` and export the PREFECT_API_URL it prints"
        )
    groups = [pending[i :: backend.runs] for i in range(min(backend.runs, len(pending)))]
    fields = storage.model_dump(include=set(StorageFields.model_fields))
    runs = [
        _run_and_wait(
            backend, GenerateParams(out=out, specs=group, engine=backend.engine, **fields)
        )
        for group in groups
    ]
    results = await asyncio.gather(*runs, return_exceptions=True)
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
    role: str = "generator",
    storage: StorageFields | None = None,
    out: str | None = None,
) -> list[Generation]:
    """Generate ``requests`` on ``backend``; results in request order.

    ``storage`` and ``out`` (the pipeline's own parameters) tell deployment runs, which
    may be on other machines, where the run directory is.
    """
    refs = write_requests(rt.store, stage, requests, backend.chunk_size)
    fields = storage or StorageFields()
    if backend.kind == "endpoint":
        identity = {"endpoint": rt.client(role).endpoint.identity}  # ConfigError if no role
        specs = generation_specs(rt, stage, refs, identity)
        http = fields.with_results(endpoint_task)
        results = await asyncio.gather(*(http(s, role) for s in specs), return_exceptions=True)
    else:
        assert backend.engine is not None
        specs = generation_specs(rt, stage, refs, {"engine": backend.engine.identity()})
        if backend.kind == "engine":
            local = fields.with_results(engine_task)
            results = []
            for s in specs:  # one engine: chunks one after another
                try:
                    results.append(await local(s, backend.engine))
                except Exception as e:
                    results.append(e)
        else:
            # Inside a storage block `out` is the path the worker resolves through the
            # block; otherwise the worker gets the absolute URL (its cwd differs).
            where = out if out is not None and fields.storage_block else rt.store.url
            await dispatch(rt.store, specs, backend, fields, where)
            results = []
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise failures[0]
    return read_generations(rt.store, specs)
