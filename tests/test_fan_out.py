"""Fan-out across workers (the pipeline kit's must-show): `mathmill server up`, three
process workers on the cpu pool, a synthesize run with ``fan_out.deployment`` set. Its
chunked stages (problems, cots, verify) are shared out among flow runs of the
``chunks`` deployment: every worker does some, every chunk is done exactly once, and
the rows are those of the same run in one flow run. Then a worker is killed while its
chunks are in flight: the run stops naming the crashed flow run, and a re-run finishes
with nothing lost or doubled and no LLM call paid twice.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mathmill.errors import IncompleteRun
from mathmill.llm.fake_server import FakeOpenAIServer, Fault, RecordedRequest, Response
from mathmill.records import Problem
from mathmill.storage import RunStore
from tests.chaos_support import descendants, jsonl_rows
from tests.deploy_support import MATHMILL, clean_env, run_cmd, server_up, worker
from tests.synth_world import SynthWorld
from tests.test_synthesize import world_config

pytestmark = pytest.mark.slow
WORKERS = 3
CRASH_AFTER_S = 90  # `server up --crash-after`: a dead flow run is marked Crashed
EXPORTS = ("verified.jsonl", "unverified.jsonl", "dropped.jsonl")


@contextmanager
def _api(url: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        yield


def _config(base_url: str, out: Path, fan_out: bool = True) -> Any:
    extra: dict[str, Any] = {"chunk_size": 2, "chunk_concurrency": 6}
    if fan_out:
        extra["fan_out"] = {"deployment": "chunks/chunks", "runs": WORKERS}
    return world_config(base_url, str(out), **extra)


def _run(cfg: Any) -> Any:
    from mathmill.flows.synthesize import synthesize

    return asyncio.run(synthesize(params=cfg))


async def _chunk_runs(url: str, out: Path) -> list[Any]:
    """The chunks flow runs of the pipeline run writing to ``out``."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with PrefectClient(url) as client:
        flt = FlowRunFilter(tags=FlowRunFilterTags(all_=["chunks"]))
        runs = await client.read_flow_runs(flow_run_filter=flt, limit=200)
    return [r for r in runs if r.parameters["params"]["run"]["out"] == str(out)]


def _rows(out: Path, base_url: str) -> dict[str, list[str]]:
    rows = jsonl_rows(out, base_url, *EXPORTS)
    return {k: [r.replace(str(out), "<out>") for r in v] for k, v in rows.items()}


def _ran_by(work: Path, runs: list[Any]) -> dict[str, set[str]]:
    """Which worker (by its log) submitted which flow runs."""
    found: dict[str, set[str]] = {}
    for i in range(WORKERS):
        log = (work / f"worker-w{i}.log").read_text()
        found[f"w{i}"] = {str(r.id) for r in runs if str(r.id) in log}
    return found


@pytest.mark.timeout(1500)
def test_a_run_fans_out_over_three_workers_and_survives_losing_one(tmp_path: Path) -> None:
    world = SynthWorld()
    holding = Holding(world)
    env = clean_env(tmp_path / "client")
    with ExitStack() as stack:
        env = stack.enter_context(server_up(tmp_path, env))
        url = env["PREFECT_API_URL"]
        port = url.rsplit(":", 1)[1].split("/")[0]
        up = [MATHMILL, "server", "up", "--home", str(tmp_path / "server"), "--port", port]
        run_cmd([*up, "--no-deploy", "--crash-after", str(CRASH_AFTER_S)], env)
        fake = stack.enter_context(FakeOpenAIServer(holding))
        wenv = env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}
        workers = [
            stack.enter_context(worker("cpu", wenv, tmp_path, limit=1, name=f"w{i}"))
            for i in range(WORKERS)
        ]
        assert len(workers) == WORKERS

        # one flow run, for the rows to expect
        with _api(url):
            alone = _run(_config(fake.base_url, tmp_path / "alone", fan_out=False))
        expected = _rows(tmp_path / "alone", fake.base_url)
        assert alone.verified > 0 and len(expected["verified.jsonl"]) == alone.verified
        calls_alone = sum(world.served.values())
        world.served.clear()

        # the same run, fanned out
        with _api(url):
            spread = _run(_config(fake.base_url, tmp_path / "spread"))
        assert _rows(tmp_path / "spread", fake.base_url) == expected
        assert spread.counts == alone.counts
        assert world.served and max(world.served.values()) == 1  # no call paid twice
        assert sum(world.served.values()) == calls_alone
        runs = asyncio.run(_chunk_runs(url, tmp_path / "spread"))
        assert runs and all(r.state.is_completed() for r in runs), [r.state for r in runs]
        by_worker = _ran_by(tmp_path, runs)
        assert all(by_worker.values()), by_worker  # every worker did some
        # each chunk in exactly one flow run's list, and done there once
        keys = Counter(
            s["stage"] + "/" + str(s["index"])
            for r in runs
            for s in r.parameters["params"]["specs"]
        )
        assert keys and max(keys.values()) == 1, keys
        stages = {k.split("/")[0] for k in keys}
        assert stages == {"problems", "cots", "verify"}
        assert (
            sum(v for k, v in keys.items() if k.startswith("cots/"))
            == spread.stages["cots"]["chunks"]
        )
        # the workers' LLM usage is in the run's report
        assert spread.usage["total"]["calls"] == alone.usage["total"]["calls"]
        assert (
            spread.usage["total"]["completion_tokens"] == alone.usage["total"]["completion_tokens"]
        )
        world.served.clear()

        # a worker dies with chunks in flight: the reasoner hangs on the problems of
        # cots chunk 0 only, so the worker running it is busy there and nowhere else
        alone_problems = RunStore(str(tmp_path / "alone")).dataset("problems")
        first = sorted(alone_problems.keys())[0]
        holding.hold = {p.statement for p in alone_problems.read_chunk(first, Problem)}
        out = tmp_path / "killed"
        with ThreadRun(_config(fake.base_url, out), url) as running:
            run_id = _wait_busy(url, out, holding, fake)
            doomed = _worker_of(tmp_path, run_id)
            for pid in [doomed, *descendants(doomed)]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            error = running.error(timeout=CRASH_AFTER_S * 4)
        holding.hold = set()
        assert isinstance(error, IncompleteRun), error
        assert f"({run_id}) ended Crashed" in str(error), error
        assert max(world.served.values()) == 1

        # a new worker in its place; the same command resumes
        stack.enter_context(worker("cpu", wenv, tmp_path, limit=1, name="w9"))
        with _api(url):
            again = _run(_config(fake.base_url, out))
        assert _rows(out, fake.base_url) == expected
        assert again.counts == alone.counts
        assert max(world.served.values()) == 1  # nothing paid twice, before or after the kill
        assert sum(world.served.values()) == calls_alone  # and nothing lost


@dataclass
class Holding:
    """The world, except that the reasoner's calls about ``hold``'s problems hang."""

    world: SynthWorld
    hold: set[str] = field(default_factory=set)
    held: int = 0

    def __call__(self, request: RecordedRequest) -> Response:
        stage = request.headers.get("x-mathmill-stage", "")
        if self.hold and stage.startswith("cot."):
            body = request.body or {}
            text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
            if any(statement in text for statement in self.hold):
                self.held += 1
                return Fault.hang(3600.0)
        return self.world(request)


def _wait_busy(url: str, out: Path, holding: Holding, fake: FakeOpenAIServer) -> str:
    """The chunks flow run with cots chunk 0, once its calls hang and nothing else is
    in flight (so a kill loses no answered call).
    """
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for run in asyncio.run(_chunk_runs(url, out)):
            params = run.parameters["params"]
            mine = any(s["stage"] == "cots" and s["index"] == 0 for s in params["specs"])
            busy = run.state is not None and run.state.is_running()
            if mine and busy and holding.held and fake.in_flight == holding.held:
                time.sleep(1.0)  # quiet for a second: the run's other calls are done
                if fake.in_flight == holding.held:
                    return str(run.id)
        time.sleep(0.5)
    raise AssertionError(f"cots chunk 0 never got busy ({holding.held} held)")


def _worker_of(work: Path, run_id: str) -> int:
    """The pid of the worker (of this test) that submitted flow run ``run_id``."""
    for pid, cmd in descendants(os.getpid()).items():
        m = re.search(r"--name (w\d)\b", cmd)
        if m and "worker" in cmd and run_id in (work / f"worker-{m.group(1)}.log").read_text():
            return pid
    raise AssertionError(f"no worker ran {run_id}")


class ThreadRun:
    """A synthesize run in a thread (the test goes on meanwhile)."""

    def __init__(self, cfg: Any, url: str) -> None:
        import threading

        self.cfg, self.url = cfg, url
        self.result: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            with _api(self.url):
                self.result = _run(self.cfg)
        except BaseException as e:
            self._error = e

    def __enter__(self) -> ThreadRun:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(5)

    def error(self, timeout: float) -> BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end after the kill"
        return self._error
