"""The server under load, shared by tests/test_server_load.py and bench/server_load.py.

`mathmill server up` (SQLite, or PostgreSQL with ``--database``) with the pools and
deployments of deployments/prefect.yaml, the fake LLM endpoint saved as a block, N
``prefect worker start --pool cpu`` process workers; then :func:`drive` submits R
``sample/sample`` runs at once (no waiting), probes the API from the first submission
on (latency of ``read_flow_runs``, ``read_task_runs`` and ``create_flow_run`` calls),
waits for every run to end and counts each run's task runs on the server.

A sample run here is ``1 + ceil(problems / chunk)`` task runs: the load task and one
sample task per chunk of problems (tests/data/gsm8k_test.jsonl, the first
``problems``), each a request for ``samples`` solutions to the fake server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from tests.deploy_support import MATHMILL, ROOT, clean_env, run_cmd, server_up, worker

PROBLEMS = ROOT / "tests" / "data" / "gsm8k_test.jsonl"
DEPLOYMENT = "sample/sample"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
T = TypeVar("T")


def sample_reply(request: RecordedRequest) -> Reply:
    """n short solutions, the i-th ending in \\boxed{i}: graded, with logprobs."""
    n = int((request.body or {}).get("n") or 1)
    return Reply(contents=[f"Adding up, the answer is \\boxed{{{i}}}." for i in range(n)])


@dataclass(frozen=True)
class Load:
    """The runs to submit: ``runs`` sample runs of ``problems`` problems in chunks of
    ``chunk`` (one task run each), ``samples`` solutions per problem.
    """

    runs: int = 20
    problems: int = 8
    chunk: int = 1
    samples: int = 2

    @property
    def tasks_per_run(self) -> int:
        """The task runs each flow run records: load + one per generation chunk."""
        return 1 + math.ceil(self.problems / self.chunk)

    def parameters(self, i: int, out: Path) -> dict[str, Any]:
        """The ``params`` of the i-th run (its own seed and run directory)."""
        return {
            "params": {
                "input": str(PROBLEMS),
                "limit": self.problems,
                "out": str(out / f"run-{i:03d}"),
                "samples": self.samples,
                "max_tokens": 32,
                "seed": i,
                "chunk_size": self.chunk,
                "backend": {"kind": "endpoint"},
                "model": {"block": "fake", "max_retries": 1},
                "concurrency": 4,
            }
        }


@dataclass
class LoadReport:
    """What :func:`drive` saw."""

    database: str
    runs: int
    states: Counter[str]
    wall_s: float  # first submission to the last run's end
    task_runs: int  # recorded, in a terminal state
    task_runs_expected: int
    task_states: Counter[str]
    short: dict[str, int]  # flow run name -> task runs recorded, where fewer than expected
    recorder_lag_s: float  # last run's end to the last task run recorded
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # run name -> state message
    api_errors: Counter[str] = field(default_factory=Counter)
    start_lag_s: list[float] = field(default_factory=list)  # created -> running, per run
    run_s: list[float] = field(default_factory=list)  # running -> ended, per run
    server_errors: Counter[str] = field(default_factory=Counter)  # see server_errors()

    @property
    def completed(self) -> int:
        return self.states.get("COMPLETED", 0)

    @property
    def runs_per_min(self) -> float:
        return 60.0 * self.completed / self.wall_s if self.wall_s else 0.0

    def percentiles(self, kind: str) -> tuple[float, float, int]:
        """p50, p99 (ms) and the number of API calls of one kind ("all": every kind)."""
        if kind == "all":
            return _pct([x for xs in self.latency_ms.values() for x in xs])
        return _pct(self.latency_ms.get(kind, []))

    def lines(self) -> list[str]:
        """The report as printable lines."""
        lag50, lag99, _ = _pct(self.start_lag_s)
        run50, run99, _ = _pct(self.run_s)
        tasks = "all COMPLETED" if set(self.task_states) == {"COMPLETED"} else self.task_states
        out = [
            f"{self.database}: {self.completed}/{self.runs} runs completed in "
            f"{self.wall_s:.1f}s = {self.runs_per_min:.1f} runs/min"
            + ("" if self.completed == self.runs else f" ({dict(self.states)})"),
            f"  task runs recorded {self.task_runs}/{self.task_runs_expected} ({tasks}); "
            f"all read back {self.recorder_lag_s:.1f}s after the last run ended"
            + (f"; short: {self.short}" if self.short else ""),
            f"  runs: submitted to running p50 {lag50:.1f}s p99 {lag99:.1f}s; "
            f"running p50 {run50:.1f}s p99 {run99:.1f}s",
        ]
        for kind in [*self.latency_ms, "all"]:
            p50, p99, n = self.percentiles(kind)
            out.append(f"  API {kind:<32} n={n:<4} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
        if self.api_errors:
            out.append(f"  API errors: {dict(self.api_errors)}")
        for kind, n in sorted(self.server_errors.items(), key=lambda kv: -kv[1]):
            out.append(f"  server log: {n} x {kind[:200]}")
        for name, message in self.failures.items():
            out.append(f"  {name}: {message}")
        return out


def _pct(xs: list[float]) -> tuple[float, float, int]:
    """p50, p99 (nearest rank) and the count."""
    s = sorted(xs)
    if not s:
        return (math.nan, math.nan, 0)
    return (statistics.median(s), s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)], len(s))


@dataclass
class Loaded:
    """A server set up for the load, with workers running."""

    env: dict[str, str]
    url: str
    work: Path
    fake: FakeOpenAIServer
    worker_logs: list[Path]
    server_log: Path


@contextlib.contextmanager
def loaded_server(
    work: Path,
    database: str | None = None,
    workers: int = 3,
    limit: int = 4,
    query_s: float = 2.0,
    env_extra: dict[str, str] | None = None,
) -> Iterator[Loaded]:
    """`mathmill server up` (``--database`` when given) in ``work``, the fake endpoint
    saved as block ``fake``, ``workers`` process workers on the cpu pool (``--limit
    limit`` each, polling every ``query_s``); all stopped on exit. ``env_extra`` goes
    to every process (the server's too).
    """
    # the server logs the requests it answers 503 (locked database): counted in reports
    env = clean_env(work / "client") | {"PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}
    env |= env_extra or {}
    with (
        server_up(work, env, database) as env,
        FakeOpenAIServer(sample_reply) as fake,
        contextlib.ExitStack() as stack,
    ):
        opts = ["--model", "fake", "--max-concurrency", "8"]
        run_cmd([MATHMILL, "blocks", "llm", "fake", "--base-url", fake.base_url, *opts], env)
        wenv = env | {
            "MATHMILL_CACHE_DIR": str(work / "cache"),
            "PREFECT_WORKER_QUERY_SECONDS": str(query_s),
        }
        logs = [
            stack.enter_context(worker("cpu", wenv, work, limit=limit, name=f"cpu-{i}"))
            for i in range(workers)
        ]
        yield Loaded(env, env["PREFECT_API_URL"], work, fake, logs, work / "server" / "server.log")


async def _timed(report: LoadReport, kind: str, call: Awaitable[T]) -> T | None:
    """Await ``call`` (a coroutine, not started yet), adding its latency to the report;
    None when it failed (counted by kind, error and status).
    """
    started = time.perf_counter()
    try:
        result = await call
    except Exception as e:  # counted, not fatal: the report says how many
        status = getattr(getattr(e, "response", None), "status_code", None)
        report.api_errors[f"{kind}: {type(e).__name__}" + (f" {status}" if status else "")] += 1
        return None
    report.latency_ms.setdefault(kind, []).append(1000 * (time.perf_counter() - started))
    return result


async def drive(
    url: str,
    load: Load,
    out: Path,
    database: str,
    deadline_s: float = 600.0,
    probe_every_s: float = 0.25,
    record_wait_s: float = 120.0,
) -> LoadReport:
    """Submit ``load.runs`` runs of sample/sample at once, probe the API every
    ``probe_every_s`` while they go, wait (``deadline_s`` at most) for all to end, then
    (``record_wait_s`` at most) for every run's task runs to be recorded.
    """
    from prefect import flow
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.states import Completed

    @flow(name="api-probe")
    def probe_flow() -> None:  # only its runs are created, as records
        return None

    report = LoadReport(
        database=database,
        runs=load.runs,
        states=Counter(),
        wall_s=0.0,
        task_runs=0,
        task_runs_expected=load.runs * load.tasks_per_run,
        task_states=Counter(),
        short={},
        recorder_lag_s=0.0,
    )
    async with PrefectClient(url, httpx_settings={"timeout": 60}) as client:
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        started = time.perf_counter()

        async def submit(i: int) -> Any:
            params = load.parameters(i, out)
            create = client.create_flow_run_from_deployment(
                deployment.id, parameters=params, name=f"load-{i:03d}"
            )
            return await _timed(report, "create_flow_run_from_deployment", create)

        of_load = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        done = asyncio.Event()

        async def probe() -> None:  # from the first submission on
            n = 0
            while not done.is_set():
                n += 1
                listing = client.read_flow_runs(deployment_filter=of_load, limit=load.runs)
                tasks = client.read_task_runs(deployment_filter=of_load, limit=50)
                record = client.create_flow_run(probe_flow, name=f"probe-{n}", state=Completed())
                await _timed(report, "read_flow_runs", listing)
                await _timed(report, "read_task_runs", tasks)
                await _timed(report, "create_flow_run", record)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), probe_every_s)

        prober = asyncio.create_task(probe())
        created = await asyncio.gather(*(submit(i) for i in range(load.runs)))
        ids = [r.id for r in created if r is not None]
        report.states["NOT CREATED"] = load.runs - len(ids)
        by_ids = FlowRunFilter(id=FlowRunFilterId(any_=ids))
        runs: list[Any] = []
        try:
            while ids and time.perf_counter() - started < deadline_s:
                runs = await client.read_flow_runs(flow_run_filter=by_ids)
                if len(runs) == len(ids) and all(
                    r.state and r.state.type.value in TERMINAL for r in runs
                ):
                    break
                await asyncio.sleep(1.0)
        finally:
            done.set()
            await prober
        ended = time.perf_counter()
        ends = [r.end_time for r in runs if r.end_time is not None]
        first = min((r.created for r in runs if r.created is not None), default=None)
        report.wall_s = (max(ends) - first).total_seconds() if ends and first else ended - started
        for r in runs:
            if r.start_time and r.created:
                report.start_lag_s.append((r.start_time - r.created).total_seconds())
            if r.start_time and r.end_time:
                report.run_s.append((r.end_time - r.start_time).total_seconds())
            state = r.state.type.value if r.state else "NONE"
            report.states[state] += 1
            if state != "COMPLETED":
                report.failures[r.name] = f"{state}: {r.state.message if r.state else ''}"
        report.states["NOT ENDED"] += load.runs - sum(report.states.values())
        report.states += Counter()  # drops zero counts

        # task runs are recorded from events, after the fact: wait until all are there
        record_started = time.perf_counter()
        while True:
            counts: dict[Any, list[str]] = {}
            for r in runs:
                tasks = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])), limit=200
                )
                counts[r.name] = [t.state.type.value if t.state else "NONE" for t in tasks]
            ok = [s for s in counts.values() if s.count("COMPLETED") == load.tasks_per_run]
            if len(ok) == len(runs) or time.perf_counter() - record_started > record_wait_s:
                break
            await asyncio.sleep(1.0)
        report.recorder_lag_s = time.perf_counter() - ended
        report.task_states = Counter(s for states in counts.values() for s in states)
        report.task_runs = sum(report.task_states[s] for s in TERMINAL)
        report.short = {name: len(s) for name, s in counts.items() if len(s) < load.tasks_per_run}
    return report


_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| (\w+)\s*\| (.*)$")


def server_errors(log: Path) -> Counter[str]:
    """The server log's ERROR records, counted by kind: ``logger - message: the last
    line of its traceback`` (timings and names of workers left out).
    """
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return Counter()
    found: Counter[str] = Counter()
    current: list[str] | None = None

    def close() -> None:
        if current:
            last = next((x for x in reversed(current[1:]) if x and not x.startswith(" ")), "")
            head = re.sub(r"\[\s*\d+ms\]\s*|: work_pool=.*$", "", current[0])
            found[f"{head}: {last}".rstrip(": ")] += 1

    for line in lines:
        m = _RECORD.match(line)
        if m:
            close()
            current = [m.group(2)] if m.group(1) == "ERROR" else None
        elif current is not None and not line.startswith(("[", "(")):  # SQL, parameters
            current.append(line)
    close()
    return found


def retried(errors: Counter[str]) -> int:
    """How many requests failed on a locked or unreachable database and were answered
    503 (the client retries them): logged with PREFECT_API_LOG_RETRYABLE_ERRORS.
    """
    return sum(n for kind, n in errors.items() if "retryable exception" in kind)


def run_load(
    work: Path,
    load: Load,
    database: str | None,
    label: str,
    workers: int = 3,
    limit: int = 4,
    env_extra: dict[str, str] | None = None,
) -> tuple[LoadReport, Loaded]:
    """Set up (:func:`loaded_server`) and :func:`drive` one load; the report (with the
    server log's errors).
    """
    with loaded_server(work, database, workers, limit, env_extra=env_extra) as loaded:
        report = asyncio.run(drive(loaded.url, load, work / "runs", label))
    report.server_errors = server_errors(loaded.server_log)
    return report, loaded
