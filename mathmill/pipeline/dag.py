"""A pipeline is a DAG of declared stages over named datasets, with one params model.

:class:`Pipeline` lists its :class:`Step` s (a stage and how its params come from the
pipeline's); a stage reads the datasets other stages write. :func:`run_pipeline`
resolves every stage's params before the first call, opens the run's resources, runs
the DAG and hands the chunks written to :func:`~mathmill.pipeline.finish.finish_run`.

How chunks flow: a ``source`` stage runs once; a ``whole`` stage runs once over every
chunk of its inputs, when they are all written; a ``chunks`` stage runs once per chunk
(a *lane*) of its first input, as soon as that chunk is written, so consecutive chunk
stages are pipelined lane by lane. A whole stage that writes ``"problems/00003"``
opens one lane per output chunk. At most ``chunk_concurrency`` chunks run at once;
later stages go first, so finished rows reach the end early. A chunk that fails does
not stop the others: its lane's later stages are skipped, the run finishes what it
can, then stops with :class:`~mathmill.errors.IncompleteRun`; a re-run resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from mathmill.pipeline.budget import open_budget, save_spend
from mathmill.pipeline.chunks import ChunkSpec, Runtime, StageOutput, use_runtime
from mathmill.pipeline.progress import Listener, Tracker
from mathmill.pipeline.stage import Stage, execute
from mathmill.storage import ChunkRef

__all__ = ["Pipeline", "Resources", "RunState", "Step", "open_pipeline_runtime", "run_pipeline"]

PP = TypeVar("PP", bound=BaseModel)
RR = TypeVar("RR", bound=BaseModel)
log = logging.getLogger("mathmill.pipeline")


@dataclass(frozen=True)
class Step:
    """A stage in a pipeline: its params from the pipeline's params (validated before
    the run starts), and how its chunks are cut.

    ``slice_rows``: cut each chunk of the first input into slices of this many rows, one
    chunk each (a few topics make many problems). ``extra``: more spec config, part of
    the cache key (handed to the stage as ``chunk.extra``).
    """

    stage: Stage[Any]
    params: Callable[[Any], BaseModel]
    slice_rows: Callable[[Any], int] | None = None
    extra: Callable[[Any], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.slice_rows is not None and (
            self.stage.kind != "chunks" or len(self.stage.inputs) != 1
        ):
            raise ValueError(
                f"step {self.stage.name}: slice_rows cuts the one input of a chunks stage"
            )


@dataclass(frozen=True)
class Resources:
    """What a run opens: roles to endpoints (``ModelRole``), roles that generate on vLLM
    instead (``GenBackend``), the sandbox (``SandboxOptions``), rows in flight per
    chunk, chunks in flight.
    """

    roles: Mapping[str, Any]
    sandbox: Any = None
    backends: Mapping[str, Any] = field(default_factory=dict)
    row_concurrency: int = 64
    chunk_concurrency: int = 4


@dataclass
class RunState:
    """A run as :func:`~mathmill.pipeline.finish.finish_run` and the pipeline's hooks
    see it.
    """

    pipeline: Pipeline[Any, Any]
    params: Any
    rt: Runtime
    tracker: Tracker
    refs: list[ChunkRef]
    failures: list[BaseException]
    started: float
    prefect: bool
    _rows: dict[tuple[str, type[Any]], list[Any]] = field(default_factory=dict, repr=False)

    def by_dataset(self) -> dict[str, list[ChunkRef]]:
        """The run's chunks by dataset, in order."""
        grouped: dict[str, list[ChunkRef]] = {}
        for ref in sorted(self.refs, key=lambda r: (r.dataset, r.key)):
            grouped.setdefault(ref.dataset, []).append(ref)
        return grouped

    def rows(self, dataset: str) -> int:
        """Rows the run wrote to ``dataset``."""
        return sum(r.rows for r in self.refs if r.dataset == dataset)

    def read(self, dataset: str, model: type[Any]) -> list[Any]:
        """Every row the run wrote to ``dataset``, as ``model`` records, chunk by chunk
        in chunk-key order (a chunked stage's: its input order). Read once per run: the
        exports, report and statistics hooks share it (a new list each call).
        """
        rows = self._rows.get((dataset, model))
        if rows is None:
            data = self.rt.store.dataset(dataset)
            chunks = self.by_dataset().get(dataset, [])
            rows = [row for ref in chunks for row in data.read_chunk(ref, model)]
            self._rows[(dataset, model)] = rows
        return list(rows)


Hook = Callable[[RunState], Any]


@dataclass(eq=False)
class Pipeline(Generic[PP, RR]):
    """A declared pipeline.

    ``resources``: roles, sandbox and concurrency from the params. ``result``: the
    result model (a :class:`~mathmill.pipeline.finish.RunResult`); ``summary`` adds its
    own fields. ``exports``: datasets written whole as ``<name>.jsonl``;
    ``extra_exports``: other files (name -> URL). ``report``: a markdown section put
    before the counts; ``stats``: the pipeline's statistics as ``{"metric", "value"}``
    rows (a report section, the ``<name>-stats`` table artifact, ``result.stats``).
    ``listed``: datasets whose directories the result names. ``setup``: runs once the
    runtime is open (semaphores, hooks in ``rt.extra``).
    """

    name: str
    params: type[PP]
    steps: Sequence[Step]
    resources: Callable[[PP], Resources]
    result: type[RR]
    exports: Sequence[str] = ()
    listed: Sequence[str] = ()
    extra_exports: Hook | None = None
    report: Hook | None = None
    stats: Hook | None = None
    summary: Hook | None = None
    setup: Callable[[Runtime, PP], None] | None = None
    description: str = ""
    ref: str = ""
    """Where workers import it from (``module:attribute``), for fan-out."""

    def __post_init__(self) -> None:
        """The DAG is checked when declared: each input written by an earlier step (so
        there is no cycle), each dataset written by one step.
        """
        written: dict[str, str] = {}
        for step in self.steps:
            name = step.stage.name
            for dataset in step.stage.inputs:
                if dataset not in written:
                    raise ValueError(
                        f"pipeline {self.name}: stage {name} reads {dataset!r}, which no "
                        "earlier stage writes"
                    )
            for dataset in step.stage.outputs:
                if dataset in written or dataset == "dropped":
                    raise ValueError(
                        f"pipeline {self.name}: stage {name} writes {dataset!r}, which "
                        f"{written.get(dataset, 'every stage')} writes too"
                    )
                written[dataset] = name

    def datasets(self) -> list[str]:
        """Every dataset the pipeline's stages write (``dropped`` included)."""
        names = [n for s in self.steps for n in s.stage.outputs]
        return list(dict.fromkeys([*names, "dropped"]))

    def stage_params(self, params: PP) -> list[BaseModel]:
        """Each step's params, resolved and validated (before any call)."""
        return [step.params(params) for step in self.steps]

    def step(self, stage: str) -> Step:
        """The step of stage ``stage``."""
        for step in self.steps:
            if step.stage.name == stage:
                return step
        raise KeyError(f"pipeline {self.name} has no stage {stage!r}")


@contextlib.asynccontextmanager
async def open_pipeline_runtime(
    pipeline: Pipeline[PP, Any], params: PP
) -> AsyncIterator[tuple[Runtime, Resources]]:
    """The run's resources (run directory, endpoints or vLLM backends per role, the
    sandbox), set up as the pipeline asks; closed on exit.
    """
    from mathmill.flows.resources import open_runtime

    res = pipeline.resources(params)
    storage = await params.storage_config(params.out)  # type: ignore[attr-defined]
    async with open_runtime(
        storage, res.roles, sandbox=res.sandbox, row_concurrency=res.row_concurrency
    ) as rt:
        rt.backends = dict(res.backends)
        rt.params = params
        open_budget(rt, params)  # the budget, and what earlier runs here spent
        if pipeline.setup is not None:
            pipeline.setup(rt, params)
        yield rt, res


async def run_pipeline(
    pipeline: Pipeline[PP, RR],
    params: PP,
    *,
    prefect: bool = True,
    listener: Listener | None = None,
) -> RR:
    """Run ``pipeline``: resolve its stage params and check its input (before any call),
    open the runtime, run the DAG, finish (exports, report, manifest, artifacts). With
    ``dry_run`` set in the params, stop after the checks. With ``prefect=False`` the
    stages run as plain functions (no task runs, no artifacts).
    """
    from mathmill.pipeline.finish import finish_run
    from mathmill.pipeline.progress import live_listener

    stage_params = pipeline.stage_params(params)
    check_input = getattr(params, "check_input", None)
    if callable(check_input):
        check_input()
    if getattr(params, "dry_run", False):
        steps = {
            s.stage.name: p.model_dump(mode="json")
            for s, p in zip(pipeline.steps, stage_params, strict=True)
        }
        logger = log
        if prefect:
            from prefect import get_run_logger

            logger = get_run_logger()  # type: ignore[assignment]
        logger.info("%s dry run: %s", pipeline.name, json.dumps(steps, default=str))
        return pipeline.result(out=params.out, dry_run=True)  # type: ignore[attr-defined]
    started = time.perf_counter()
    listener = listener or live_listener.get()
    _prewarm(pipeline)
    async with open_pipeline_runtime(pipeline, params) as (rt, res):
        with use_runtime(rt):
            tracker = Tracker(artifacts=prefect, listener=listener, meter=rt.pool.meter)
            if prefect:  # created while the first stage runs
                tracker.create_artifact(f"{pipeline.name}-progress", f"{pipeline.name}: starting")
            runner = _Runner(pipeline, stage_params, params, rt, tracker, prefect)
            refs, failures = await runner.run(res.chunk_concurrency)
            state = RunState(pipeline, params, rt, tracker, refs, failures, started, prefect)
            result: RR = await finish_run(state)
            return result


def _prewarm(pipeline: Pipeline[Any, Any]) -> None:
    """Have the helper process (:mod:`mathmill.sidecar`) import, while the run works,
    what its stages' side work (grading) and then the dataset report (matplotlib) need.
    """
    from mathmill import sidecar

    sidecar.warm(*(m for step in pipeline.steps for m in step.stage.warm), *sidecar.REPORT)


Call = Callable[[Stage[Any], Any, BaseModel], Awaitable[StageOutput]]


def _caller(params: Any, prefect: bool) -> Call:
    """A stage chunk as a Prefect task run (results in the params' result storage), or
    as the plain function.
    """

    def call(stage_: Stage[Any], spec: Any, stage_params: BaseModel) -> Awaitable[StageOutput]:
        if not prefect:
            return execute(stage_, spec, stage_params)
        task_ = params.with_results(stage_.task) if hasattr(params, "with_results") else stage_.task
        run: Awaitable[StageOutput] = task_(spec, stage_params)
        return run

    return call


# -- the DAG runner -----------------------------------------------------------------

Lane = asyncio.Future  # resolves to the lane's refs of a dataset, or None (failed upstream)


@dataclass
class _Dataset:
    """A dataset's lanes, known once its producer has planned (or run) its chunks."""

    lanes: asyncio.Future[list[Lane[list[ChunkRef] | None]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _Gate:
    """At most ``n`` chunks at once; waiting chunks of later steps go first."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.waiting: list[tuple[tuple[int, int, int], asyncio.Future[None]]] = []
        self.order = itertools.count()

    async def acquire(self, step: int, index: int) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, ((-step, index, next(self.order)), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot, then cancelled: pass it on
            raise

    def release(self) -> None:
        while self.waiting:
            _, future = heapq.heappop(self.waiting)
            if not future.done():
                future.set_result(None)
                return
        self.free += 1


class _Runner:
    """One run of a pipeline's DAG: each step's chunks as their inputs become ready."""

    def __init__(
        self,
        pipeline: Pipeline[Any, Any],
        stage_params: Sequence[BaseModel],
        params: Any,
        rt: Runtime,
        tracker: Tracker,
        prefect: bool,
    ) -> None:
        self.pipeline = pipeline
        self.steps = pipeline.steps
        self.stage_params = stage_params
        self.params = params
        self.rt = rt
        self.tracker = tracker
        self.call = _caller(params, prefect)
        self.written: list[ChunkRef] = []
        self.failures: list[BaseException] = []
        self.produced: dict[str, _Dataset] = {}
        self.gate = _Gate(1)

    async def run(self, chunk_concurrency: int) -> tuple[list[ChunkRef], list[BaseException]]:
        """Every chunk written, and the failures (a failed chunk's later stages are
        skipped, not failed again).
        """
        self.gate = _Gate(chunk_concurrency)
        for step in self.steps:
            for name in step.stage.outputs:
                self.produced.setdefault(name, _Dataset())
        ends = await asyncio.gather(
            *(self._step(pos) for pos in range(len(self.steps))), return_exceptions=True
        )
        self.failures.extend(e for e in ends if isinstance(e, BaseException))
        return self.written, self.failures

    def spec(self, pos: int, index: int, inputs: list[ChunkRef], **extra: Any) -> ChunkSpec:
        """The spec of chunk ``index`` of step ``pos``."""
        return self.steps[pos].stage.spec(self.rt, self.stage_params[pos], index, inputs, **extra)

    async def local(self, pos: int, spec: ChunkSpec) -> StageOutput:
        """One chunk in this flow run (a gate slot held while it runs)."""
        stage_ = self.steps[pos].stage
        await self.gate.acquire(pos, spec.index)
        try:
            return await self.tracker.run(
                stage_.name, self.call(stage_, spec, self.stage_params[pos])
            )
        finally:
            self.gate.release()

    async def done(self, pos: int, index: int, out: StageOutput) -> None:
        self.written.extend(out.refs.values())
        save_spend(self.rt)
        self.tracker.publish_soon(f"{self.steps[pos].stage.name} chunk {index + 1} done")

    async def _step(self, pos: int) -> None:
        step = self.steps[pos]
        stage_ = step.stage
        outs = {name: self.produced[name] for name in stage_.outputs}
        try:
            if stage_.kind == "chunks":
                await self._lanes(pos)
                return
            extra = step.extra(self.params) if step.extra else {}
            self.tracker.plan(stage_.name, 1)
            refs = await _collect([await self.produced[n].lanes for n in stage_.inputs])
            out: StageOutput | None = None
            if refs is not None:
                try:
                    out = await self.local(pos, self.spec(pos, 0, refs, **extra))
                    await self.done(pos, 0, out)
                except Exception as e:
                    self.failures.append(e)
            loop = asyncio.get_running_loop()
            for name, ds in outs.items():
                # one lane per chunk written; a failed chunk: one lane that says so
                values = [None] if out is None else [[part] for part in _parts(out, name)]
                ds.lanes.set_result([_resolved(loop, value) for value in values])
        finally:
            for ds in outs.values():  # a bug above must not leave later stages waiting
                if not ds.lanes.done():
                    ds.lanes.set_result([])

    async def _lanes(self, pos: int) -> None:
        """A ``chunks`` stage: one chunk per lane (or slice) of its first input, in
        this flow run or fanned out.
        """
        step = self.steps[pos]
        stage_ = step.stage
        extra = step.extra(self.params) if step.extra else {}
        jobs = await self._jobs(step)
        self.tracker.plan(stage_.name, len(jobs))
        loop = asyncio.get_running_loop()
        out_lanes = {name: [loop.create_future() for _ in jobs] for name in stage_.outputs}
        for name in stage_.outputs:
            self.produced[name].lanes.set_result(out_lanes[name])
        fan = getattr(self.params, "fan_out", None)
        remote = (
            _Batch(self, pos, len(jobs)) if fan is not None and fan.applies(stage_.name) else None
        )

        async def job(i: int, ins: list[Any], cut: tuple[int, int] | None) -> None:
            out: StageOutput | None = None
            submitted = False
            try:
                refs = await _collect(item if isinstance(item, list) else [item] for item in ins)
                if refs is not None:
                    more = extra if cut is None else {**extra, "slice": list(cut)}
                    spec = self.spec(pos, i, refs, **more)
                    if remote is not None:
                        submitted = True
                        out = await self.tracker.run(stage_.name, remote.submit(spec))
                    else:
                        out = await self.local(pos, spec)
                    await self.done(pos, i, out)
            except Exception as e:  # this chunk failed; the others go on
                out = None
                self.failures.append(e)
            finally:
                if remote is not None and not submitted:
                    remote.skip()  # the batch must not wait for a chunk that never comes
                for name, futures in out_lanes.items():
                    if not futures[i].done():
                        futures[i].set_result(None if out is None else _parts(out, name))

        await asyncio.gather(*(job(i, ins, cut) for i, ins, cut in jobs))

    async def _jobs(self, step: Step) -> list[tuple[int, list[Any], tuple[int, int] | None]]:
        """The chunks of a ``chunks`` step: (index, input lanes, row slice)."""
        first, *others = list(step.stage.inputs)
        first_lanes = await self.produced[first].lanes
        side = {name: await self.produced[name].lanes for name in others}
        jobs: list[tuple[int, list[Any], tuple[int, int] | None]] = []
        if step.slice_rows is None:
            for i, lane in enumerate(first_lanes):
                # a side input with as many lanes is zipped; another is read whole by each
                ins: list[Any] = [lane]
                ins += [ls[i] if len(ls) == len(first_lanes) else ls for ls in side.values()]
                jobs.append((i, ins, None))
            return jobs
        size = max(1, step.slice_rows(self.params))
        for lane in first_lanes:
            got = await lane
            if got is None:  # failed upstream: one job that is skipped
                jobs.append((len(jobs), [lane], None))
                continue
            rows = sum(r.rows for r in got)
            for start in range(0, rows, size):
                jobs.append((len(jobs), [lane], (start, min(start + size, rows))))
        return jobs


class _Batch:
    """The chunks of a fanned-out stage: collected until every job has its spec (or
    is skipped), then sent to the deployment together.
    """

    def __init__(self, runner: _Runner, pos: int, expected: int) -> None:
        self.runner = runner
        self.pos = pos
        self.expected = expected
        self.waiting: list[tuple[ChunkSpec, asyncio.Future[StageOutput]]] = []
        self.ended = 0
        self.sending: asyncio.Task[None] | None = None

    def skip(self) -> None:
        self.ended += 1
        self._maybe_send()

    async def submit(self, spec: ChunkSpec) -> StageOutput:
        future: asyncio.Future[StageOutput] = asyncio.get_running_loop().create_future()
        self.waiting.append((spec, future))
        self.ended += 1
        self._maybe_send()
        return await future

    def _maybe_send(self) -> None:
        if self.ended == self.expected and self.waiting and self.sending is None:
            self.sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        from mathmill.pipeline.fanout import fan_out_chunks

        r = self.runner
        specs = [spec for spec, _ in self.waiting]
        try:
            outs = await fan_out_chunks(
                r.pipeline, r.steps[self.pos].stage.name, specs, r.params, r.params.fan_out, r.rt
            )
        except BaseException as e:  # no server, no deployment: every chunk says why
            outs = [e] * len(specs)
        for (_, future), out in zip(self.waiting, outs, strict=True):
            if isinstance(out, BaseException):
                future.set_exception(out)
            else:
                future.set_result(out)


async def _collect(
    groups: Iterable[Sequence[Lane[list[ChunkRef] | None]]],
) -> list[ChunkRef] | None:
    """The refs of every lane in ``groups``, in order; None when any failed upstream."""
    refs: list[ChunkRef] | None = []
    for lanes in groups:
        for lane in lanes:
            got = await lane
            refs = None if got is None or refs is None else [*refs, *got]
    return refs


def _resolved(
    loop: asyncio.AbstractEventLoop, value: list[ChunkRef] | None
) -> Lane[list[ChunkRef] | None]:
    lane: Lane[list[ChunkRef] | None] = loop.create_future()
    lane.set_result(value)
    return lane


def _parts(out: StageOutput, dataset: str) -> list[ChunkRef]:
    """The chunks ``out`` wrote to ``dataset`` (``dataset`` or ``dataset/NNNNN``), in order."""
    return [ref for name, ref in sorted(out.refs.items()) if name.split("/")[0] == dataset]
