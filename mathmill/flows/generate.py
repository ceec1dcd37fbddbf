"""The ``generate`` flow: GPU inference on the ``vllm`` work pool.

Pipelines do not call it directly: a stage calls
:func:`mathmill.tasks.generation.generate` for a role, and a role whose backend is
``deployment`` has its request chunks shared out among ``backend.runs`` flow runs of
this flow's deployment (``run_deployment``); each run loads the engine once and works
through its chunks, writing each chunk's generations next to the pipeline's other
outputs, so a re-run dispatches only what is missing. Each run records its usage
(calls, tokens, engine seconds) in the run directory for the pipeline's report and
budget.
"""

from __future__ import annotations

import json
import logging
import time

from prefect import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import ConfigError
from mathmill.flows.options import StorageFields
from mathmill.llm.client import LLMPool
from mathmill.llm.vllm_engine import EngineConfig, get_engine
from mathmill.pipeline.chunks import (
    ChunkSpec,
    Runtime,
    StageOutput,
    use_runtime,
)
from mathmill.pipeline.fanout import usage_path
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import Generation
from mathmill.storage import RunStore
from mathmill.tasks.generation import (
    engine_generate,
)

__all__ = ["GenerateParams", "GenerateResult", "generate"]

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


@pipeline_flow("generate")
async def generate(params: GenerateParams) -> GenerateResult:
    """Chunks of prompts in, chunks of completions with usage out, on vLLM's engine
    (loaded once for the whole run)."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = RunStore(await params.storage_config(params.out))
    rt = Runtime(store=store, pool=LLMPool(), endpoints={})
    result = GenerateResult(chunks=len(params.specs))
    task = params.with_results(engine_generate.task)
    with use_runtime(rt):
        for spec in params.specs:
            if spec.store_url != store.url:
                raise ConfigError(
                    f"chunk {spec.key} belongs to {spec.store_url}, not to {store.url}: "
                    "out and storage_block must name the caller's run directory"
                )
            out: StageOutput = await task(spec, params.engine)
            load_s = 0.0  # the engine's load time, in the first chunk that ran it
            if result.engine_load_s is None and not out.reused:
                result.engine_load_s = load_s = get_engine(params.engine).load_s
            _add(result, spec.stage, out)
            if not out.reused:
                _record_usage(rt, spec.stage, out, load_s)
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


def _record_usage(rt: Runtime, stage: str, out: StageOutput, load_s: float) -> None:
    """Count a generated chunk in the run's meter (a call per request with its tokens,
    the engine's seconds without its load) and record the meter in the run directory,
    where the pipeline's dispatch adds it to its own (``usage_path``).
    """
    from prefect.runtime import flow_run

    meter, store = rt.pool.meter, rt.store
    engine_s = max(0.0, out.counts.get(f"{stage}.engine_ms", 0) / 1000.0 - load_s)
    meter.record_gpu(stage, engine_s)
    for name, ref in out.refs.items():
        if name.split("/")[0] != "generations":
            continue
        for g in store.dataset("generations").read_chunk(ref, Generation):
            meter.record(
                stage,
                model=g.model,
                prompt_tokens=g.usage.prompt_tokens,
                completion_tokens=g.usage.completion_tokens,
                latency_ms=engine_s * 1000.0,
                error=g.error is not None,
            )
    store.write_bytes(usage_path(str(flow_run.id)), json.dumps(meter.summary()).encode())


def _add(result: GenerateResult, stage: str, out: StageOutput) -> None:
    c = out.counts
    result.reused += int(out.reused)
    result.requests += c.get(f"{stage}.requests", 0)
    result.samples += c.get(f"{stage}.samples", 0)
    result.errors += c.get(f"{stage}.errors", 0)
    result.prompt_tokens += c.get(f"{stage}.prompt_tokens", 0)
    result.completion_tokens += c.get(f"{stage}.completion_tokens", 0)
