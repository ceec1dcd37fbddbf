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
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from mathmill.flows.options import InputFields, ModelRole, SandboxOptions, StorageFields
from mathmill.flows.progress import Tracker
from mathmill.flows.resources import open_runtime
from mathmill.flows.synthesize import IncompleteRun
from mathmill.records import Attempt, Problem, SamplingParams
from mathmill.storage import ChunkRef, RunStore
from mathmill.tasks.export import (
    dump_json,
    export_jsonl,
    remove_stale_chunks,
    report_markdown,
    write_run_file,
)
from mathmill.tasks.runtime import (
    ChunkSpec,
    Runtime,
    StageOutput,
    code_version,
    prompt_hashes,
    use_runtime,
)
from mathmill.tasks.tir import TirConfig, TurnHook, load_spec, load_task, tir_task
from mathmill.tasks.tir_export import chat_messages, sharegpt, tir_stats

__all__ = ["TirParams", "TirResult", "run_tir", "tir", "turn_hook"]

SOLVER_DEFAULTS = ModelRole(temperature=0.6, max_tokens=1024)
turn_hook: contextvars.ContextVar[TurnHook | None] = contextvars.ContextVar(
    "mathmill_tir_turn_hook", default=None
)
"""Set by ``mathmill run tir --debug`` to print each turn as it happens."""


class TirParams(InputFields, StorageFields):
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


class TirResult(BaseModel):
    """Where a tir run's outputs are, and its statistics."""

    out: str
    dry_run: bool = False
    problems: int = 0
    stats: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    usage: dict[str, dict[str, float]] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    wall_s: float = 0.0


@flow(name="tir", validate_parameters=True, log_prints=False)
async def tir(params: TirParams) -> TirResult:
    """Tool-integrated reasoning trajectories, validated against expected answers."""
    return await run_tir(params)


async def run_tir(params: TirParams) -> TirResult:
    """The tir pipeline: load → per chunk: trajectories → exports, stats, report."""
    logger = get_run_logger()
    solver = params.solver.over(SOLVER_DEFAULTS)
    cfg = TirConfig(
        max_turns=params.max_turns,
        max_nudges=params.max_nudges,
        max_output_chars=params.max_output_chars,
        turn_timeout_s=params.sandbox.timeout_s,
        samples=params.samples,
        sampling=SamplingParams(
            temperature=solver.temperature, max_tokens=solver.max_tokens, seed=params.seed
        ),
    )
    params.check_input()
    if params.dry_run:
        logger.info("dry run: %s", cfg.model_dump_json())
        return TirResult(out=params.out, dry_run=True)
    started = time.perf_counter()
    storage = await params.storage_config(params.out)
    sessions = params.sandbox.max_sessions
    async with open_runtime(
        storage,
        {"solver": solver},
        sandbox=params.sandbox,
        row_concurrency=min(params.concurrency, sessions),
    ) as rt:
        rt.extra["sessions"] = asyncio.Semaphore(sessions)
        rt.extra["on_turn"] = turn_hook.get()
        with use_runtime(rt):
            tracker = Tracker(1, artifacts=False)
            refs, problems, failures = await _run(params, cfg, rt, tracker)
            return await _finish(params, rt, tracker, refs, problems, failures, started)


def _tir_spec(rt: Runtime, index: int, inputs: list[ChunkRef], **config: Any) -> ChunkSpec:
    modules = (
        "mathmill.tasks.tir",
        "mathmill.tasks.runtime",
        "mathmill.sources",
        "mathmill.grading.equivalence",
        "mathmill.grading.extract",
    )
    return ChunkSpec(
        stage="tir",
        index=index,
        inputs=inputs,
        config=config,
        prompts=prompt_hashes("tir_system", "tir_user"),
        code=code_version(*modules),
        store_url=rt.store.url,
    )


async def _run(
    params: TirParams, cfg: TirConfig, rt: Runtime, tracker: Tracker
) -> tuple[list[ChunkRef], int, list[BaseException]]:
    input_spec = load_spec(rt.store.url, params.load_config(params.chunk_size))
    load, run_tir_chunk = params.with_results(load_task), params.with_results(tir_task)
    loaded = await tracker.run("load", load(input_spec, params.chunk_size))
    chunks = [ref for name, ref in sorted(loaded.refs.items()) if name.startswith("problems")]
    solver = rt.endpoints["solver"].identity

    async def solve(i: int, ref: ChunkRef) -> StageOutput:
        spec = _tir_spec(rt, i, [ref], tir=cfg.model_dump(mode="json"), solver=solver)
        return await tracker.run("tir", run_tir_chunk(spec, cfg))

    results = await asyncio.gather(
        *(solve(i, ref) for i, ref in enumerate(chunks)), return_exceptions=True
    )
    outs = [loaded] + [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    problems = sum(ref.rows for ref in chunks)
    return [ref for o in outs for ref in o.refs.values()], problems, failures


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


async def _finish(
    params: TirParams,
    rt: Runtime,
    tracker: Tracker,
    refs: list[ChunkRef],
    problems: int,
    failures: list[BaseException],
    started: float,
) -> TirResult:
    logger = get_run_logger()
    store = rt.store
    outputs: dict[str, str] = {"trajectories": f"{store.url}/trajectories/"}
    if not failures:
        outputs |= _exports(store, refs, params.samples)
        dropped = [r for r in refs if r.dataset == "dropped"]
        outputs["dropped.jsonl"] = export_jsonl(store, "dropped.jsonl", dropped)
        remove_stale_chunks(store, ("problems", "trajectories", "dropped"), refs)
    outputs["report"] = f"{store.url}/report.md"
    stats = tir_stats(tracker.counts)
    status = "complete" if not failures else f"INCOMPLETE ({len(failures)} chunks failed)"
    table = "\n".join(
        ["## Statistics", "", "| metric | value |", "|---|---|"]
        + [f"| {r['metric']} | {r['value']} |" for r in stats]
    )
    wall = time.perf_counter() - started
    report = report_markdown(
        f"tir run: {status}", tracker.counts, rt.pool.meter, tracker.timing_table(), outputs, wall
    )
    report = report.replace("## Rows by stage", table + "\n\n## Rows by stage", 1)
    write_run_file(store, "report.md", report.encode(), failed=bool(failures))
    result = TirResult(
        out=store.url,
        problems=problems,
        stats={str(r["metric"]): r["value"] for r in stats},
        counts=dict(tracker.counts),
        usage=rt.pool.meter.summary(),
        outputs=outputs,
        wall_s=wall,
    )
    manifest = {
        "status": status,
        "params": params.model_dump(mode="json"),
        "result": result.model_dump(mode="json"),
        "chunks": [r.model_dump(mode="json") for r in refs],
    }
    write_run_file(store, "manifest.json", dump_json(manifest), failed=bool(failures))
    await acreate_table_artifact(stats, key="tir-stats", description=f"tir statistics ({status})")
    await acreate_markdown_artifact(report, key="tir-report", description="tir run report")
    if failures:
        raise IncompleteRun(
            f"{len(failures)} chunks did not finish (first: {failures[0]}); finished "
            f"trajectories are kept in {store.url}; re-run the same command to resume"
        ) from failures[0]
    logger.info("tir: %s", ", ".join(f"{r['metric']}={r['value']}" for r in stats[:4]))
    return result
