"""The crash campaign: ``kill -9`` of ``mathmill run <pipeline>`` at random points, then
the same command again, which must write what an uninterrupted run writes (no row lost
or doubled) and pay for no finished LLM call twice.

Each kill point runs the CLI as a subprocess (its own process group) in a fresh run
directory against a fresh fake OpenAI server whose scripted handler is wrapped by
:class:`Counting`: it counts answers by request body and stops answering after the kill
point's number of answers (later requests hang: in flight, never answered). Then the
harness SIGKILLs the process group, either at once (answers may still be on their way
into the call cache) or once every answered call is in the run's call cache and a random
moment more (the run goes on with its sandbox and chunk writes); start-up kill points
answer nothing and kill after a random part of the reference run's start-up. It checks
that no process of the run outlived the kill, re-runs the same command to completion on
the same server and compares the output rows with an uninterrupted run's. A *finished*
call is one in the killed run's call cache: a call answered twice beyond those that were
not is a call paid twice.

Used by bench/chaos.py (20 kill points per pipeline) and tests/test_crash_campaign.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mathmill.llm.fake_server import FakeOpenAIServer, Fault, RecordedRequest, Reply, Response
from tests.synth_world import SynthWorld
from tests.test_synthesize import CLI, cli_args, cli_env, rows_of
from tests.test_tir_resume import Solver
from tests.test_tir_resume import command as tir_command
from tests.test_tir_resume import write_input as write_tir_input

Handler = Callable[[RecordedRequest], Response]
Rows = dict[str, list[str]]  # output -> its rows, normalized, as sorted JSON lines

RUN_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = 20.0
STARTUP_SHARE = 5  # one kill point in five (at least one) is during start-up
FINISH_SHARE = 10  # one in ten after the last answer, while the outputs are written
WORKDIR = re.compile(r"--workdir (\S+)")  # a sandbox worker's command line
JITTER_S = 0.3  # the run goes on (sandbox, chunk writes) this long at most after its calls


@dataclass
class Counting:
    """Wraps a scripted handler: counts the requests answered and each answer by stage
    and request body (``served``, so a call paid twice shows), and stops answering after
    ``stop_after`` answers (later requests hang until the client is killed).
    """

    inner: Handler
    stop_after: int | None = None
    answered: int = 0
    first_at: float | None = None
    last_at: float = 0.0
    served: Counter[str] = field(default_factory=Counter)
    stopped: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.stop_after == 0:
            self.stopped.set()

    def __call__(self, request: RecordedRequest) -> Response:
        with self._lock:
            if self.first_at is None:
                self.first_at = time.monotonic()
            if self.stopped.is_set():
                return Fault.hang(3600.0)
        response = self.inner(request)
        with self._lock:
            self.answered += 1
            self.last_at = time.monotonic()
            if isinstance(response, Reply):
                stage = request.headers.get("x-mathmill-stage", "")
                self.served[stage + "|" + json.dumps(request.body, sort_keys=True)] += 1
            if self.stop_after is not None and self.answered >= self.stop_after:
                self.stopped.set()
        return response

    def paid_twice(self) -> dict[str, int]:
        """Requests answered more than once (stage|body -> times)."""
        with self._lock:
            return {k: v for k, v in self.served.items() if v > 1}

    def finished_calls(self) -> int:
        """Distinct requests answered with a completion."""
        with self._lock:
            return len(self.served)


@dataclass(frozen=True)
class Pipeline:
    """One ``mathmill run`` command: a fresh scripted handler, the argv for a base URL and
    a run directory, and the run's output rows normalized for comparison.
    """

    name: str
    handler: Callable[[], Handler]
    command: Callable[[str, Path], list[str]]
    rows: Callable[[Path, str], Rows]


def normalize_row(value: Any, base_url: str) -> Any:
    """Without run-specific fields (timestamps), the fake server's port hidden."""
    if isinstance(value, dict):
        return {k: normalize_row(v, base_url) for k, v in value.items() if k != "created_at"}
    if isinstance(value, list):
        return [normalize_row(v, base_url) for v in value]
    if isinstance(value, str):
        return value.replace(base_url, "<endpoint>")
    return value


def jsonl_rows(out: Path, base_url: str, *names: str) -> Rows:
    """Each JSONL export's rows, normalized, as sorted canonical JSON lines."""
    rows: Rows = {}
    for name in names:
        path = out / name
        lines = path.read_text().splitlines() if path.exists() else []
        rows[name] = sorted(
            json.dumps(normalize_row(json.loads(line), base_url), sort_keys=True) for line in lines
        )
    return rows


def synthesize_rows(out: Path, base_url: str) -> Rows:
    parquet = [json.dumps(r, sort_keys=True, default=str) for r in rows_of(out, base_url)]
    names = ("verified.jsonl", "unverified.jsonl", "dropped.jsonl")
    return {"verified+unverified": sorted(parquet), **jsonl_rows(out, base_url, *names)}


def sample_reply(request: RecordedRequest) -> Response:
    """n solutions, each a pure function of the problem and its index."""
    body = request.body or {}
    text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    n = int(body.get("n") or 1)
    k = sum(map(ord, text))
    return Reply(
        contents=[f"Sample {i}: so the answer is \\boxed{{{(k + i) % 7}}}" for i in range(n)]
    )


def pipelines(workdir: Path) -> list[Pipeline]:
    """synthesize (5 topics of tests/synth_world.py: rewritten to verified, HTTP 400,
    answer in the problem, duplicate problems, crashing code; 2 problems each, 2 rewrite
    rounds, chunks of 2 problems), tir (12 problems of 3 turns, chunks of 3) and sample
    (10 problems x 2 samples, chunks of 2 requests), their inputs written under
    ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    tir_input = write_tir_input(workdir / "tir.jsonl")
    tir_config = workdir / "tir.json"
    tir_config.write_text(json.dumps({"chunk_size": 3}))
    sample_input = workdir / "sample.jsonl"
    sample_input.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "problem": f"What is {i} mod 7?", "answer": str(i % 7)})
            + "\n"
            for i in range(10)
        )
    )
    synth_kinds = ("fix", "bad", "leaky", "dup", "crash")
    return [
        Pipeline(
            "synthesize",
            lambda: SynthWorld(kinds=synth_kinds),
            lambda url, out: [*cli_args(url, out), "--topics", "5", "--chunk-size", "2"],
            synthesize_rows,
        ),
        Pipeline(
            "tir",
            Solver,
            lambda url, out: [*tir_command(url, tir_input, out), "--config", str(tir_config)],
            lambda out, url: jsonl_rows(
                out, url, "sharegpt.jsonl", "messages.jsonl", "failed.jsonl"
            ),
        ),
        Pipeline(
            "sample",
            lambda: sample_reply,
            lambda url, out: [
                *CLI,
                "run",
                *("sample", "--input", str(sample_input), "--out", str(out)),
                *("--samples", "2", "--chunk-size", "2", "--base-url", url, "--model", "fake"),
            ],
            lambda out, url: jsonl_rows(out, url, "samples.jsonl", "dropped.jsonl"),
        ),
    ]


# -- one run, one kill point ---------------------------------------------------------------


@dataclass
class Reference:
    rows: Rows
    requests: int
    startup_s: float  # from the start of the command to its first request
    finish_s: float  # from its last answer to its exit


@dataclass
class KillPoint:
    """Where a run is killed. ``requests`` == 0: ``delay_s`` after the start, before any
    request is answered. Otherwise after ``requests`` answers: ``settled``, once every
    answered call is in the call cache and ``delay_s`` more (the run goes on with its
    sandbox and chunk writes); not settled, at once, answers still on their way in.
    """

    requests: int
    delay_s: float = 0.0
    settled: bool = True

    def __str__(self) -> str:
        if self.requests == 0:
            return f"start-up +{self.delay_s:.2f}s"
        if not self.settled:
            return f"at answer {self.requests}"
        return f"after answer {self.requests} +{self.delay_s:.2f}s"


@dataclass
class Outcome:
    point: KillPoint
    answered_before_kill: int = 0
    unfinished: int = 0  # calls answered before the kill that were not in the call cache
    exited_before_kill: bool = False
    paid_twice: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    doubled: int = 0
    survivors: list[str] = field(default_factory=list)
    temporaries: int = 0  # hidden .tmp- files of killed writes left in the run directory
    sandbox_dirs: list[str] = field(default_factory=list)  # sandbox work dirs left behind
    rerun_requests: int = 0
    rerun_s: float = 0.0
    problem: str = ""  # why this kill point failed; empty when it resumed identically

    @property
    def finished_paid_twice(self) -> int:
        """Calls answered twice beyond those the killed run had not finished (answered,
        not yet in its call cache): a re-run asks those again, as it must.
        """
        twice = sum(v - 1 for v in self.paid_twice.values())
        return max(0, twice - self.unfinished)

    @property
    def ok(self) -> bool:
        return not self.problem


def run_to_end(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def reference_run(pipeline: Pipeline, workdir: Path, env: dict[str, str]) -> Reference:
    """The uninterrupted run: its rows, its number of answered requests, its start-up."""
    world = Counting(pipeline.handler())
    out = workdir / f"{pipeline.name}-reference"
    with FakeOpenAIServer(world) as fake:
        started = time.monotonic()
        done = run_to_end(pipeline.command(fake.base_url, out), env)
        ended = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"{pipeline.name}: the reference run failed:\n{done.stderr[-3000:]}")
    if world.paid_twice():
        raise RuntimeError(f"{pipeline.name}: the reference run paid twice: {world.paid_twice()}")
    assert world.first_at is not None
    return Reference(
        pipeline.rows(out, fake.base_url),
        world.answered,
        world.first_at - started,
        ended - world.last_at,
    )


def cached_calls(out: Path) -> int:
    """Calls in the run's call cache (committed rows; read by another connection)."""
    path = out / ".cache" / "llm-calls.sqlite"
    if not path.exists():
        return 0
    try:  # a plain connection: read-only ones cannot open a WAL file left without -shm
        with closing(sqlite3.connect(path)) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM calls").fetchone()
    except sqlite3.Error:
        return 0
    return int(count)


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root`` (pid -> command line)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found[pid] = cmd.strip()
            todo.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def compare(expected: Rows, got: Rows, outcome: Outcome) -> None:
    for name, rows in expected.items():
        have = Counter(got.get(name, []))
        want = Counter(rows)
        outcome.lost += sum((want - have).values())
        outcome.doubled += sum((have - want).values())
        if have != want and not outcome.problem:
            outcome.problem = f"{name}: rows differ from the uninterrupted run"


def kill_and_resume(
    pipeline: Pipeline, reference: Reference, point: KillPoint, out: Path, env: dict[str, str]
) -> Outcome:
    """One kill point: start the command, stop answering at the point (later requests
    hang), SIGKILL the process group, re-run the command, compare.
    """
    outcome = Outcome(point)
    world = Counting(pipeline.handler(), stop_after=point.requests)
    with (
        FakeOpenAIServer(world) as fake,
        open(out.parent / f"{out.name}.stderr", "w+b") as stderr,
    ):
        argv = pipeline.command(fake.base_url, out)
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not world.stopped.wait(0.01) and proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no kill point after {RUN_TIMEOUT_S}s")
            if point.settled:
                settle = time.monotonic() + SETTLE_TIMEOUT_S
                while (n := world.finished_calls()) and cached_calls(out) < n:
                    if proc.poll() is not None:
                        break
                    if time.monotonic() > settle:
                        outcome.problem = f"answers not in the call cache after {SETTLE_TIMEOUT_S}s"
                        break
                    time.sleep(0.01)
                time.sleep(point.delay_s)
            below = descendants(proc.pid)
            outcome.exited_before_kill = proc.poll() is not None
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        outcome.answered_before_kill = world.answered
        outcome.unfinished = world.finished_calls() - cached_calls(out)
        if outcome.exited_before_kill and proc.returncode != 0:
            stderr.seek(0)
            outcome.problem = "the run failed: " + stderr.read().decode(errors="replace")[-3000:]
        gone = time.monotonic() + 10
        while any(alive(pid) for pid in below) and time.monotonic() < gone:
            time.sleep(0.05)
        outcome.survivors = [f"{pid} {cmd}" for pid, cmd in below.items() if alive(pid)]
        workdirs = {m.group(1) for cmd in below.values() if (m := WORKDIR.search(cmd))}
        outcome.sandbox_dirs = sorted(d for d in workdirs if os.path.exists(d))
        if outcome.survivors and not outcome.problem:
            outcome.problem = f"processes outlived the kill: {outcome.survivors}"
        world.stop_after = None
        world.stopped.clear()
        answered, started = world.answered, time.monotonic()
        resumed = run_to_end(argv, env)
        outcome.rerun_s = time.monotonic() - started
        outcome.rerun_requests = world.answered - answered
        outcome.temporaries = sum(1 for _ in out.rglob(".tmp-*"))
        outcome.paid_twice = world.paid_twice()
        if resumed.returncode != 0:
            outcome.problem = outcome.problem or f"the re-run failed:\n{resumed.stderr[-3000:]}"
            return outcome
        compare(reference.rows, pipeline.rows(out, fake.base_url), outcome)
    if outcome.finished_paid_twice and not outcome.problem:
        outcome.problem = f"{outcome.finished_paid_twice} finished calls paid twice"
    return outcome


# -- the campaign --------------------------------------------------------------------------


def kill_points(reference: Reference, kills: int, rng: random.Random) -> list[KillPoint]:
    """``kills`` points: one in five (at least one) during start-up; one in ten while the
    run writes its outputs after its last answer; the others after a random number of
    answered requests between the first and the last of a full run, alternately settled
    and at once.
    """
    startup = max(1, kills // STARTUP_SHARE) if kills else 0
    finish = kills // FINISH_SHARE
    points = [KillPoint(0, rng.uniform(0.0, reference.startup_s)) for _ in range(startup)]
    points += [
        KillPoint(rng.randint(1, reference.requests), rng.uniform(0.0, JITTER_S), i % 2 == 0)
        for i in range(kills - startup - finish)
    ]
    points += [
        KillPoint(reference.requests, rng.uniform(0.0, reference.finish_s)) for _ in range(finish)
    ]
    return points


@dataclass
class Report:
    pipeline: str
    reference: Reference
    outcomes: list[Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def not_cancelled(record: logging.LogRecord) -> bool:
    """The requests a killed run left hanging are cancelled when its fake server stops:
    not worth a traceback each.
    """
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def campaign(
    chosen: list[Pipeline],
    workdir: Path,
    env: dict[str, str],
    *,
    kills: int,
    seed: int,
    log: Callable[[str], None] = lambda _line: None,
) -> list[Report]:
    """Every pipeline: a reference run, then ``kills`` kill points (seeded per
    pipeline, so choosing fewer pipelines does not move the others' points).
    """
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not_cancelled not in uvicorn_log.filters:
        uvicorn_log.addFilter(not_cancelled)
    reports = []
    for pipeline in chosen:
        rng = random.Random(f"{seed}-{pipeline.name}")
        reference = reference_run(pipeline, workdir, env)
        log(
            f"{pipeline.name}: reference run, {reference.requests} requests, "
            f"first after {reference.startup_s:.2f}s, exit {reference.finish_s:.2f}s after "
            "the last"
        )
        outcomes = []
        for i, point in enumerate(kill_points(reference, kills, rng)):
            out = workdir / f"{pipeline.name}-kill-{i:02d}"
            outcome = kill_and_resume(pipeline, reference, point, out, env)
            outcomes.append(outcome)
            verdict = "ok" if outcome.ok else "FAILED: " + outcome.problem
            log(
                f"{pipeline.name} #{i:02d} {point}: killed after {outcome.answered_before_kill}"
                f" answers ({outcome.unfinished} not in the call cache)"
                f"{', had exited' if outcome.exited_before_kill else ''}; re-run "
                f"{outcome.rerun_s:.1f}s, {outcome.rerun_requests} requests: {verdict}"
            )
        reports.append(Report(pipeline.name, reference, outcomes))
    return reports


def table(reports: list[Report]) -> str:
    """The campaign as a markdown table, one line per pipeline."""
    lines = [
        "| pipeline | requests in a full run | kill points tried | resumed identically "
        "| finished calls paid twice | unfinished calls asked again | rows lost / doubled "
        "| temporaries left | sandbox dirs left | mean re-run s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        tried = len(r.outcomes)
        same = sum(o.ok for o in r.outcomes)
        twice = sum(o.finished_paid_twice for o in r.outcomes)
        again = sum(sum(v - 1 for v in o.paid_twice.values()) for o in r.outcomes) - twice
        lost = sum(o.lost for o in r.outcomes)
        doubled = sum(o.doubled for o in r.outcomes)
        mean = sum(o.rerun_s for o in r.outcomes) / tried if tried else 0.0
        lines.append(
            f"| {r.pipeline} | {r.reference.requests} | {tried} | {same} | {twice} | {again} "
            f"| {lost} / {doubled} | {sum(o.temporaries for o in r.outcomes)} "
            f"| {sum(len(o.sandbox_dirs) for o in r.outcomes)} | {mean:.1f} |"
        )
    return "\n".join(lines)


@contextmanager
def prefect_server(results: Path) -> Iterator[dict[str, str]]:
    """A Prefect server for the campaign (Prefect's test harness: a temporary SQLite
    database), stopped at the end; yields the environment the CLI runs need.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}),
    ):
        yield {
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": os.environ.get("PATH", ""),
        }


def run_env(prefect_api: dict[str, str]) -> dict[str, str]:
    """What the CLI subprocesses get: the test's environment and the Prefect server."""
    return cli_env(prefect_api)
