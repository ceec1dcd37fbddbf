"""The ``tir`` flow: tool-integrated reasoning trajectories against stateful sandbox
sessions, exported as ShareGPT and chat-template JSONL with statistics.

>>> TirParams(input="problems.jsonl").max_turns
8
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
from typing import Any

from pydantic import ConfigDict, Field

from mathmill.flows.options import InputFields, ModelRole, SandboxOptions, StorageFields
from mathmill.pipeline.budget import BudgetFields
from mathmill.pipeline.chunks import Runtime
from mathmill.pipeline.dag import Pipeline, Resources, RunState, Step, run_pipeline
from mathmill.pipeline.fanout import FanOutFields
from mathmill.pipeline.finish import RunResult
from mathmill.pipeline.flow import pipeline_flow
from mathmill.records import Attempt, Problem, SamplingParams
from mathmill.storage import ChunkRef, RunStore
from mathmill.tasks.load import LoadConfig, load
from mathmill.tasks.tir import TirConfig, TurnHook, trajectories
from mathmill.tasks.tir_export import chat_messages, sharegpt, tir_stats

__all__ = ["PIPELINE", "TirParams", "TirResult", "tir", "turn_hook"]

SOLVER_DEFAULTS = ModelRole(temperature=0.6, max_tokens=1024)
turn_hook: contextvars.ContextVar[TurnHook | None] = contextvars.ContextVar(
    "mathmill_tir_turn_hook", default=None
)
"""Set by ``mathmill run tir --debug`` to print each turn as it happens."""


class TirParams(InputFields, FanOutFields, BudgetFields, StorageFields):
    """Parameters of the tir flow (one form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(
        "runs/tir",
        description="Run directory: local path, s3://bucket/prefix, or a path inside "
        "storage_block (re-run to resume).",
    )
    samples: int = Field(1, ge=1, le=64, description="Trajectories per problem.")
    max_turns: int = Field(8, ge=1, le=100, description="Model replies per trajectory.")
    max_nudges: int = Field(2, ge=0, le=10, description="'Run code first' nudges at most.")
    max_output_chars: int = Field(2000, ge=100, le=100_000, description="<repl> output cap.")
    chunk_size: int = Field(50, ge=1, le=10_000, description="Problems per chunk (task).")
    concurrency: int = Field(16, ge=1, le=1024, description="Trajectories in flight.")
    seed: int = Field(0, ge=0, description="Base seed; sample i uses seed + i.")
    dry_run: bool = Field(False, description="Validate, count the input; call nothing.")
    solver: ModelRole = Field(default_factory=ModelRole, description="The model.")
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions)


class TirResult(RunResult):
    """Where a tir run's outputs are, and its statistics."""

    problems: int = 0


def _config(params: TirParams) -> TirConfig:
    solver = params.solver.over(SOLVER_DEFAULTS)
    return TirConfig(
        max_turns=params.max_turns,
        max_nudges=params.max_nudges,
        max_output_chars=params.max_output_chars,
        turn_timeout_s=params.sandbox.timeout_s,
        samples=params.samples,
        sampling=SamplingParams(
            temperature=solver.temperature, max_tokens=solver.max_tokens, seed=params.seed
        ),
    )


def _resources(params: TirParams) -> Resources:
    return Resources(
        roles={"solver": params.solver.over(SOLVER_DEFAULTS)},
        sandbox=params.sandbox,
        row_concurrency=min(params.concurrency, params.sandbox.max_sessions),
        # enough chunks to keep `concurrency` trajectories busy, one more for the tails
        chunk_concurrency=1
        if params.concurrency == 1
        else -(-params.concurrency // params.chunk_size) + 1,
    )


def _setup(rt: Runtime, params: TirParams) -> None:
    rt.extra["sessions"] = asyncio.Semaphore(params.sandbox.max_sessions)
    rt.extra["on_turn"] = turn_hook.get()


def _summary(state: RunState) -> dict[str, Any]:
    return {"problems": state.rows("problems")}


PIPELINE: Pipeline[TirParams, TirResult] = Pipeline(
    name="tir",
    params=TirParams,
    steps=[
        Step(load, lambda p: LoadConfig(**p.load_config(p.chunk_size))),
        Step(trajectories, _config),
    ],
    resources=_resources,
    result=TirResult,
    exports=("dropped",),
    listed=("trajectories",),
    extra_exports=lambda state: _exports(state.rt.store, state.refs, state.params.samples),
    stats=lambda state: tir_stats(state.tracker.counts),
    summary=_summary,
    setup=_setup,
    ref="mathmill.flows.tir:PIPELINE",
    description="Tool-integrated reasoning trajectories against a stateful sandbox.",
)
"""load → per chunk of problems: trajectories → ShareGPT and chat exports, stats."""


@pipeline_flow("tir")
async def tir(params: TirParams) -> TirResult:
    """Tool-integrated reasoning trajectories, validated against expected answers."""
    return await run_pipeline(PIPELINE, params)


def _exports(store: RunStore, refs: list[ChunkRef], samples: int) -> dict[str, str]:
    """sharegpt.jsonl and messages.jsonl (finished trajectories), failed.jsonl."""
    problems: dict[str, Problem] = {}
    for ref in refs:
        if ref.dataset == "problems":
            problems.update((p.id, p) for p in store.dataset("problems").read_chunk(ref, Problem))
    trajectories = [r for r in refs if r.dataset == "trajectories"]
    names = ("sharegpt", "messages", "failed")
    # One pass over the trajectories, three files written side by side.
    with contextlib.ExitStack() as stack:
        files = {n: stack.enter_context(store.open_write(f"{n}.jsonl")) for n in names}
        for ref in trajectories:
            for a in store.dataset("trajectories").read_chunk(ref, Attempt):
                p = problems[a.problem_id]
                if a.verdict is not None and a.verdict.status != "failed":
                    files["sharegpt"].write(dump_line(sharegpt(p, a, samples)))
                    files["messages"].write(dump_line(chat_messages(p, a, samples)))
                else:
                    files["failed"].write(dump_line(sharegpt(p, a, samples)))
    return {f"{n}.jsonl": f"{store.url}/{n}.jsonl" for n in names}


def dump_line(row: Any) -> bytes:
    """One JSONL line."""
    return json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"
