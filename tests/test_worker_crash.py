"""A process worker killed mid-deployment-run (issue 21's kill cases, on a real server).

`mathmill server up` (a real Prefect server: pools, deployments/prefect.yaml, the
automation that marks unresponsive runs crashed), the fake LLM endpoint saved as a block,
a process worker on the cpu pool; a ``sample/sample`` deployment run. When the endpoint
has answered some of the run's calls (each in the run's call cache), the worker and the
flow run's process are killed with SIGKILL, as when a machine dies. Nobody is left to
report the end: the run stays Running until its heartbeats stop long enough for the
automation to mark it Crashed. A new run with the same parameters on a new worker then
completes, pays for none of the calls the killed run finished, and writes the rows an
uninterrupted run writes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.local_server import CRASH_AUTOMATION
from tests.chaos_support import Counting, cached_calls, descendants, jsonl_rows
from tests.deploy_support import MATHMILL, clean_env, run_cmd, server_up
from tests.load_support import DEPLOYMENT, Load, sample_reply

pytestmark = pytest.mark.slow
LOAD = Load(runs=1, problems=8, chunk=1, samples=2)  # 8 calls, one chunk each
ANSWERED_BEFORE_KILL = 3
CRASH_AFTER_S = 90  # `server up --crash-after` (300 s by default)
CRASH_WAIT_S = 300.0  # heartbeats every 30 s, crashed after 90 s without one, + slack


@contextmanager
def _worker(env: dict[str, str], work: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process worker on the cpu pool in its own session; yields its process."""
    log = (work / f"worker-{name}.log").open("wb")
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu"]
    proc = subprocess.Popen(
        [*cmd, "--type", "process", "--name", name],
        env=env,
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def _submit(url: str, params: dict[str, Any], name: str) -> Any:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(url) as client:
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        run = await client.create_flow_run_from_deployment(
            deployment.id, parameters=params, name=name
        )
        return run.id


async def _state(url: str, run_id: Any) -> tuple[str, str]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(url) as client:
        run = await client.read_flow_run(run_id)
        state = run.state
        return (state.type.value, state.message or "") if state else ("NONE", "")


async def _automations(url: str) -> list[str]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(url) as client:
        return [a.name for a in await client.read_automations()]


def _wait_for(url: str, run_id: Any, wanted: set[str], timeout_s: float) -> tuple[str, str]:
    """Poll the run's state until it is one of ``wanted`` (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = asyncio.run(_state(url, run_id))
        if state[0] in wanted or time.monotonic() > deadline:
            return state
        time.sleep(2.0)


def _rows(out: Path, base_url: str) -> dict[str, list[str]]:
    rows = jsonl_rows(out, base_url, "samples.jsonl", "dropped.jsonl")
    # each row names its own run directory: the same rows, whatever the directory
    return {k: [r.replace(str(out), "<out>") for r in v] for k, v in rows.items()}


@pytest.mark.timeout(1200)
def test_a_killed_worker_crashes_its_run_and_a_new_run_resumes(tmp_path: Path) -> None:
    counting = Counting(sample_reply)
    env = clean_env(tmp_path / "client")
    with server_up(tmp_path, env) as env, FakeOpenAIServer(counting) as fake:
        url = env["PREFECT_API_URL"]
        port = url.rsplit(":", 1)[1].split("/")[0]
        up = [MATHMILL, "server", "up", "--home", str(tmp_path / "server"), "--port", port]
        # the first `up` made the automation with its default window; a shorter one here
        again = run_cmd([*up, "--no-deploy", "--crash-after", str(CRASH_AFTER_S)], env)
        assert f"heartbeat for {CRASH_AFTER_S}s marked crashed (replaced)" in again, again
        again = run_cmd([*up, "--no-deploy", "--crash-after", str(CRASH_AFTER_S)], env)
        assert f"heartbeat for {CRASH_AFTER_S}s marked crashed (kept)" in again, again
        opts = ["--model", "fake", "--max-concurrency", "8"]
        run_cmd([MATHMILL, "blocks", "llm", "fake", "--base-url", fake.base_url, *opts], env)
        wenv = env | {
            "MATHMILL_CACHE_DIR": str(tmp_path / "cache"),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }

        # an uninterrupted run, for the rows to expect
        reference = LOAD.parameters(1, tmp_path / "reference")  # same seed
        with _worker(wenv, tmp_path, "reference"):
            ref_id = asyncio.run(_submit(url, reference, "reference"))
            assert _wait_for(url, ref_id, {"COMPLETED", "FAILED", "CRASHED"}, 300)[0] == (
                "COMPLETED"
            )
        expected = _rows(tmp_path / "reference" / "run-001", fake.base_url)
        assert len(expected["samples.jsonl"]) == LOAD.problems * LOAD.samples

        # the run to kill: the endpoint answers some calls, then hangs
        counting.served.clear()
        counting.answered = 0
        counting.stop_after = ANSWERED_BEFORE_KILL
        params = LOAD.parameters(1, tmp_path / "killed")
        out = tmp_path / "killed" / "run-001"
        with _worker(wenv, tmp_path, "doomed") as doomed:
            run_id = asyncio.run(_submit(url, params, "doomed"))
            deadline = time.monotonic() + 300
            while cached_calls(out) < ANSWERED_BEFORE_KILL and time.monotonic() < deadline:
                time.sleep(0.5)
            assert cached_calls(out) == ANSWERED_BEFORE_KILL, counting.answered
            assert _wait_for(url, run_id, {"RUNNING"}, 10)[0] == "RUNNING"
            below = descendants(doomed.pid)
            assert any("prefect" in cmd for cmd in below.values()), below  # the flow run
            for pid in [doomed.pid, *below]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            doomed.wait(10)
        killed_at = time.monotonic()
        # nobody reports the end; the automation marks the run once heartbeats stop
        assert asyncio.run(_state(url, run_id))[0] == "RUNNING"
        state, message = _wait_for(url, run_id, {"CRASHED", "COMPLETED", "FAILED"}, CRASH_WAIT_S)
        assert state == "CRASHED", (state, message, time.monotonic() - killed_at)
        print(f"marked crashed {time.monotonic() - killed_at:.0f} s after the kill")  # noqa: T201
        assert f"no heartbeat for {CRASH_AFTER_S} s" in message, message
        assert not (set(descendants(os.getpid())) & set(below)), "a killed process lives on"

        # the endpoint is back; a new run of the same parameters resumes on a new worker
        paid_before = dict(counting.served)
        counting.stop_after = None
        counting.stopped.clear()
        with _worker(wenv, tmp_path, "rescue"):
            again = asyncio.run(_submit(url, params, "rescue"))
            assert _wait_for(url, again, {"COMPLETED", "FAILED", "CRASHED"}, 300)[0] == (
                "COMPLETED"
            )
        assert _rows(out, fake.base_url) == expected
        assert counting.paid_twice() == {}, counting.paid_twice()
        assert len(paid_before) == ANSWERED_BEFORE_KILL
        assert counting.finished_calls() == LOAD.problems  # each call paid once in all
        # crashed by the automation `server up` made (not by anything of this test's)
        assert asyncio.run(_automations(url)) == [CRASH_AUTOMATION]
