"""The helper process (mathmill.sidecar): side work runs in another process, gets the
same answers as in-process, falls back to this process when the helper dies, cannot
take the work or overruns, never sees API keys, dies with its parent; a run's own
process imports neither the grader's sympy nor matplotlib.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mathmill import sidecar
from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from mathmill.records import GenChoice, Generation, Problem, SamplingParams
from mathmill.tasks.sample import agrade_samples, grade_samples
from tests.resume_support import run_env

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "tests/data/problems/amc23_5.jsonl"


@pytest.fixture(autouse=True)
def fresh_helper(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts and ends without a helper (and with it on, where it can be)."""
    monkeypatch.delenv("MATHMILL_SIDECAR", raising=False)
    if not sidecar.enabled():
        pytest.skip("one CPU: the helper is off by design")
    sidecar.stop()
    monkeypatch.setattr(sidecar, "_deaths", 0)
    yield
    sidecar.stop()


def where(parent: int, sleep_s: float = 0.0) -> str:
    if os.getpid() != parent:
        time.sleep(sleep_s)
    return "parent" if os.getpid() == parent else "helper"


def die_in_helper(parent: int) -> str:
    if os.getpid() != parent:
        os._exit(3)
    return "parent"


def slow_in_helper(parent: int) -> str:
    if os.getpid() != parent:
        time.sleep(60)
    return "parent"


def fails(text: str, log: str, kind: type[Exception] = ValueError) -> str:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise kind(text)


class Unreadable(Exception):
    """An error that cannot be rebuilt from its pickle (its __init__ takes two)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def fails_unreadably() -> str:
    raise Unreadable("x", "y")


def _only_in(pid: int) -> str:
    if os.getpid() != pid:
        raise ValueError("cannot be rebuilt outside the helper")
    return "rebuilt"


class OnlyThere:
    """Unpickles only in the process that made it (the helper)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return _only_in, (self.pid,)


def unreadable_result(parent: int) -> object:
    return "parent" if os.getpid() == parent else OnlyThere()


class OnlyThereError(Exception):
    def __reduce__(self) -> tuple[object, tuple[int]]:
        return _only_in, (os.getpid(),)


def unreadable_error() -> str:
    raise OnlyThereError("made in the helper")


def touch(path: str) -> str:
    Path(path).write_text("ran")
    return "ran"


def env_value(name: str) -> str | None:
    return os.environ.get(name)


def helper_pid() -> int:
    return os.getpid()


def test_work_runs_in_the_helper_and_in_process_when_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert sidecar.call_sync(where, os.getpid()) == "helper"
    assert asyncio.run(sidecar.call(where, os.getpid())) == "helper"
    monkeypatch.setenv("MATHMILL_SIDECAR", "0")
    assert not sidecar.enabled()
    assert sidecar.call_sync(where, os.getpid()) == "parent"
    assert asyncio.run(sidecar.call(where, os.getpid(), in_thread=True)) == "parent"


def test_a_dead_helper_an_unpicklable_job_and_an_overrun_fall_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mathmill.sidecar")
    first = sidecar.call_sync(helper_pid)
    assert sidecar.call_sync(die_in_helper, os.getpid()) == "parent"
    assert "could not run die_in_helper (the helper process exited (code 3))" in caplog.text
    # a new helper after the dead one
    assert sidecar.call_sync(helper_pid) not in (first, os.getpid())
    # what does not pickle is known before it is sent, runs here, and the helper stays
    second = sidecar.call_sync(helper_pid)
    assert sidecar.call_sync(lambda: os.getpid()) == os.getpid()
    assert "<lambda> cannot go to the helper process" in caplog.text
    assert sidecar.call_sync(helper_pid) == second
    # an overrun: the helper is killed, the work done here
    assert asyncio.run(sidecar.call(slow_in_helper, os.getpid(), limit_s=2)) == "parent"
    assert "slow_in_helper took too long" in caplog.text
    assert sidecar.call_sync(helper_pid) not in (second, os.getpid())


def test_helpers_that_die_unserved_are_given_up_stopped_ones_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mathmill.sidecar")
    me = os.getpid()
    for _ in range(4):  # stopped before they finished anything: not deaths
        sidecar.warm("math_verify")
        sidecar.stop()
    assert sidecar.call_sync(where, me) == "helper"
    sidecar.stop()
    for _ in range(3):  # each dies in its first job
        assert sidecar.call_sync(die_in_helper, me) == "parent"
    assert sidecar.call_sync(where, me) == "parent"  # no fourth helper
    assert caplog.text.count("could not run die_in_helper") == 3


def test_concurrent_jobs_an_unpicklable_one_and_an_overrun(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Jobs from several chunks at once: one that does not pickle leaves the others
    alone; the time limit counts from a job's start, not its wait in the queue; an
    overrun sends the jobs behind it here, none fails.
    """
    caplog.set_level(logging.WARNING, logger="mathmill.sidecar")
    me = os.getpid()

    async def many() -> list[object]:
        return await asyncio.gather(
            sidecar.call(where, me, 1.5, limit_s=30),
            sidecar.call(where, me, 0.0, limit_s=1),  # waits 1.5 s, runs in no time
            sidecar.call(lambda: "here"),
            sidecar.call(where, me, 0.0, limit_s=1),
        )

    assert asyncio.run(many()) == ["helper", "helper", "here", "helper"]
    assert "took too long" not in caplog.text

    async def overrun() -> list[object]:
        return await asyncio.gather(
            sidecar.call(where, me, 0.0),
            sidecar.call(slow_in_helper, me, limit_s=1),
            sidecar.call(where, me, 0.0),
            sidecar.call(where, me, 0.0),
        )

    assert asyncio.run(overrun()) == ["helper", "parent", "parent", "parent"]
    assert caplog.text.count("slow_in_helper took too long") == 3  # the three behind it


def test_outcomes_this_process_cannot_read(caplog: pytest.LogCaptureFixture) -> None:
    """A result that cannot be unpickled here: the work runs here (that job alone); an
    error that cannot: a RuntimeError with its text; the helper serves on.
    """
    caplog.set_level(logging.WARNING, logger="mathmill.sidecar")
    pid = sidecar.call_sync(helper_pid)
    assert sidecar.call_sync(unreadable_result, os.getpid()) == "parent"
    assert "cannot read its outcome" in caplog.text
    with pytest.raises(RuntimeError, match="OnlyThereError: made in the helper"):
        sidecar.call_sync(unreadable_error)
    assert sidecar.call_sync(helper_pid) == pid


def test_a_job_whose_caller_gave_up_is_never_sent(tmp_path: Path) -> None:
    me, marker = os.getpid(), tmp_path / "ran.txt"

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(sidecar.call(where, me, 1.0))
        await asyncio.sleep(0.2)  # the first one is running
        gave_up = asyncio.ensure_future(sidecar.call(touch, str(marker)))
        await asyncio.sleep(0)
        gave_up.cancel()
        last = await sidecar.call(where, me, 0.0)
        return [await first, last, gave_up.cancelled()]

    assert asyncio.run(scenario()) == ["helper", "helper", True]
    assert not marker.exists()


def test_a_helper_started_by_a_thread_outlives_the_thread() -> None:
    """The kernel's parent-death signal follows the thread that started the process:
    a helper started from a worker thread must not die with that thread.
    """
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(sidecar.call_sync(helper_pid)))
    thread.start()
    thread.join()
    assert sidecar.call_sync(where, os.getpid(), 1.0) == "helper"
    assert sidecar.call_sync(helper_pid) == got[0]


def test_the_works_own_error_is_raised_as_it_is_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="mathmill.sidecar")
    log = tmp_path / "runs.txt"
    with pytest.raises(ValueError, match="bad row 7"):
        asyncio.run(sidecar.call(fails, "bad row 7", str(log)))
    with pytest.raises(TimeoutError, match="the work's own"):
        sidecar.call_sync(fails, "the work's own", str(log), TimeoutError)
    runs = log.read_text().split()
    assert len(runs) == 2 and str(os.getpid()) not in runs  # once each, in the helper
    with pytest.raises(RuntimeError, match="Unreadable: x/y"):
        sidecar.call_sync(fails_unreadably)
    assert "could not run" not in caplog.text  # none was run again here


def test_the_helper_has_no_api_keys_and_ignores_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = {
        "OPENAI_API_KEY": "sk-canary-helper",
        "MATHMILL_JUDGE_API_KEY": "sk-canary-judge",
        "MATHMILL_CANARY_KEY": "sk-canary-custom",  # a name given with --api-key-env
        "HF_TOKEN": "hf-canary",
        "PREFECT_API_KEY": "pnu-canary",
    }
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MATHMILL_KEEP_ME", "yes")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "storage-id")
    for name in keys:
        assert sidecar.call_sync(env_value, name) is None, name
    assert sidecar.call_sync(env_value, "MATHMILL_KEEP_ME") == "yes"
    pid = sidecar.call_sync(helper_pid)
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert not [v for v in keys.values() if v.encode() in environ]
    # object storage settings follow the caller's, job by job
    assert sidecar.call_sync(env_value, "AWS_ACCESS_KEY_ID") == "storage-id"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert sidecar.call_sync(env_value, "AWS_ACCESS_KEY_ID") == "rotated"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert sidecar.call_sync(env_value, "AWS_ACCESS_KEY_ID") is None
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    assert sidecar.call_sync(helper_pid) == pid


@pytest.mark.parametrize("when", ["at once", "busy", "busy, started by a thread"])
def test_the_helper_dies_with_its_parent(when: str) -> None:
    """Killed while the helper starts, or while it runs a long job (started by the main
    thread: the kernel's signal; by a thread that ended: its own watcher).
    """
    start = "sidecar.warm('math_verify')"
    if "thread" in when:
        start = f"t = threading.Thread(target=lambda: {start}); t.start(); t.join()"
    code = (
        "import os, sys, threading, time\n"
        "from mathmill import sidecar\n"
        f"{start}\n"
        "print(sidecar._current.proc.pid, flush=True)\n"
        + (
            "os.kill(os.getpid(), 9)\n"
            if when == "at once"
            else "threading.Thread(target=sidecar.call_sync, args=(time.sleep, 120)).start()\n"
        )
        + "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    helper = int(parent.stdout.readline())
    assert helper != parent.pid
    if when != "at once":
        time.sleep(3)  # it has started the long job
        os.kill(helper, 0)  # alive while its parent is
        parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(helper, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(helper, signal.SIGKILL)
        pytest.fail("the helper outlived its killed parent")


def _graded_world() -> tuple[list[Problem], list[Generation], SamplingParams]:
    rows = [json.loads(line) for line in PROBLEMS.open()]
    problems = [
        Problem(id=f"p{i}", source="t", statement=r["problem"], answer=str(r["answer"]))
        for i, r in enumerate(rows)
    ]
    texts = [
        lambda a: rf"so \boxed{{{a}}}",
        lambda a: rf"so \boxed{{{a}+1}}",
        lambda a: "no answer here",
        lambda a: rf"\boxed{{\frac{{2*({a})}}{{2}}}}",
    ]
    gens = [
        Generation(
            id=p.id,
            model="m",
            backend="endpoint",
            choices=[
                GenChoice(index=j, text=t(p.answer), finish_reason="stop", tokens=5)
                for j, t in enumerate(texts)
            ],
        )
        for p in problems
    ]
    return problems, gens, SamplingParams(n=len(texts))


def test_grading_in_the_helper_matches_grading_here(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mathmill.sidecar")
    problems, gens, sampling = _graded_world()
    here = grade_samples(problems, gens, sampling)
    there = asyncio.run(agrade_samples(problems, gens, sampling))
    skip = {"created_at"}
    assert [r.model_dump(exclude=skip) for r in there] == [r.model_dump(exclude=skip) for r in here]
    assert "could not run" not in caplog.text  # graded there, not here after all
    assert "cannot go to the helper" not in caplog.text
    statuses = {r.status for r in here}
    assert {"correct", "incorrect", "no_answer"} <= statuses, statuses


def _answer(request: RecordedRequest) -> Reply:
    """36 for every problem: right for two of the five, wrong for the others."""
    n = int((request.body or {}).get("n") or 1)
    return Reply(contents=["so the answer is \\boxed{36}"] * n)


def test_a_run_grades_and_draws_its_report_without_sympy_or_matplotlib_here(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    """The run's own process never imports the grader's math-verify/sympy nor
    matplotlib: the helper does both; the rows are graded and the report drawn.
    """
    mods = tmp_path / "modules.json"
    code = (
        "import atexit, json, sys\n"
        f"out = open({str(mods)!r}, 'w')\n"
        "atexit.register(lambda: out.write(json.dumps(sorted(sys.modules))) and out.close())\n"
        "from mathmill.cli import main\n"
        "sys.argv = ['mathmill', *sys.argv[1:]]\n"
        "main()\n"
    )
    run = tmp_path / "run"
    with FakeOpenAIServer(_answer) as fake:
        args = ["run", "sample", "--input", str(PROBLEMS)]
        args += ["--samples", "2", "--base-url", fake.base_url, "--model", "m"]
        done = subprocess.run(
            [sys.executable, "-c", code, *args, "--out", str(run)],
            capture_output=True,
            text=True,
            env=run_env(prefect_api),
            timeout=600,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(mods.read_text()))
    assert not {"math_verify", "sympy", "matplotlib"} & loaded
    rows = [json.loads(line) for line in (run / "samples.jsonl").open()]
    assert len(rows) == 10
    right = {r["problem"]: r["answer"] == "36" for r in map(json.loads, PROBLEMS.open())}
    assert all(r["final_answer"] == "36" for r in rows)
    assert [r["status"] for r in rows] == [
        "correct" if right[r["problem"]] else "incorrect" for r in rows
    ]
    assert sum(r["status"] == "correct" for r in rows) == 4
    html = (run / "report.html").read_text()
    assert "report/rows.png" in html
    assert (run / "report" / "rows.png").read_bytes()[:4] == b"\x89PNG"
