"""The run's progress in the terminal (``mathmill run``): the live view of a tracker's
figures and the LLM usage, its plain lines where stdout is no terminal, and a real
sample run through the command line that feeds it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply
from mathmill.llm.usage import UsageMeter
from mathmill.pipeline.chunks import StageOutput
from mathmill.pipeline.progress import (
    LiveProgress,
    StageProgress,
    Tracker,
    duration,
    eta_text,
    live_listener,
    llm_line,
    plain_line,
)
from mathmill.storage import ChunkRef

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "tests" / "data" / "problems" / "amc23_5.jsonl"


def output(dataset: str, rows: int, *, reused: bool = False, dropped: int = 0) -> StageOutput:
    """A finished chunk that wrote ``rows`` rows to ``dataset`` (and some dropped)."""

    def ref(name: str, n: int) -> ChunkRef:
        return ChunkRef(
            dataset=name, key="00000", path=f"/x/{name}", sha256="0" * 64, rows=n, nbytes=1,
            record_type="r",
        )  # fmt: skip

    refs = {dataset: ref(dataset, rows)} | ({"dropped": ref("dropped", dropped)} if dropped else {})
    return StageOutput(stage=dataset, key="00000", refs=refs, reused=reused)


async def finished(out: StageOutput) -> StageOutput:
    return out


async def broken() -> StageOutput:
    raise RuntimeError("chunk failed")


def a_meter() -> UsageMeter:
    meter = UsageMeter()
    meter.record("generate", model="m", prompt_tokens=1234, completion_tokens=567, cost_usd=0.0123)
    meter.record("generate", model="m", prompt_tokens=10, completion_tokens=5)
    meter.record("generate", model="m", cached=True)
    return meter


async def feed(tracker: Tracker) -> None:
    """load: 1 of 1 chunks; generate: 3 of 5 (one reused); grade: 0 of 5."""
    tracker.plan("load", 1)
    await tracker.run("load", finished(output("problems", 5)))
    tracker.plan("generate", 5)
    for i in range(3):
        await tracker.run("generate", finished(output("samples", 4, reused=i == 0, dropped=1)))
    tracker.plan("grade", 5)


def text_console(**kw: Any) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=120, color_system=None, **kw), buf


def test_the_view_shows_each_stage_its_chunks_rows_eta_and_the_llm_usage() -> None:
    console, buf = text_console()
    view = LiveProgress(console, title="sample", live=True)
    tracker = Tracker(artifacts=False, listener=view, meter=a_meter())
    asyncio.run(feed(tracker))
    console.print(view.render())
    text = buf.getvalue()
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "sample 36.4% (4/11 chunks)" in text  # the progress artifact's figure
    assert "1/1 chunks" in lines["load"] and "5 rows" in lines["load"]
    assert "done" in lines["load"]
    # dropped rows are not rows written; the reused chunk is said
    assert "3/5 chunks" in lines["generate"] and "12 rows" in lines["generate"]
    assert "1 reused" in lines["generate"] and "ETA" in lines["generate"]
    assert "0/5 chunks" in lines["grade"] and "ETA ?" in lines["grade"]
    assert lines["LLM:"].strip() == (
        "LLM: 2 calls (1 cached), 1,244 prompt + 572 completion tokens, $0.0123"
    )
    # stages in the order they started, those not started last
    assert [k for k in lines if k in tracker.stages] == ["load", "generate", "grade"]


def test_the_listener_only_notes_the_change_the_refresh_draws_it() -> None:
    console, buf = text_console(force_terminal=True)
    view = LiveProgress(console, title="t", live=True)  # not entered: nothing draws
    tracker = Tracker(artifacts=False, listener=view)
    tracker.plan("s", 2)
    asyncio.run(tracker.run("s", finished(output("rows", 7))))
    assert buf.getvalue() == ""
    assert view.tracker is tracker
    console.print(view.render())
    assert "1/2 chunks" in buf.getvalue() and "7 rows" in buf.getvalue()
    assert "LLM" not in buf.getvalue()  # no meter, no calls: no line
    # the figures drawn are a copy taken when they changed, not the live objects
    asyncio.run(tracker.run("s", finished(output("rows", 3))))
    assert view._snapshot[0][1].done == 1
    console.print(view.render())
    assert "2/2 chunks" in buf.getvalue() and "10 rows" in buf.getvalue()


def test_on_a_terminal_it_draws_live_and_keeps_the_last_frame() -> None:
    console, buf = text_console(force_terminal=True)
    logger = logging.getLogger("mathmill.test_live_progress")
    handler = logging.StreamHandler(sys.stderr)
    original = handler.stream
    logger.addHandler(handler)
    try:
        with LiveProgress(console, title="sample", refresh_per_second=20) as view:
            tracker = Tracker(artifacts=False, listener=view, meter=a_meter())
            asyncio.run(feed(tracker))
            assert handler.stream is not original  # log lines go above the view
            logger.warning("a log line while the view is drawn")
            tracker.plan("more", 0)
        assert handler.stream is original
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    assert "\x1b[" in text  # redrawn in place
    assert "a log line while the view is drawn" in text
    last = text[text.rindex("sample 36.4%") :]  # the final frame stays on screen
    for expected in ("3/5 chunks", "12 rows", "0/5 chunks", "LLM: 2 calls"):
        assert expected in last


def test_without_a_terminal_a_plain_line_per_finished_stage_then_the_rest() -> None:
    console, buf = text_console()
    with LiveProgress(console, title="sample") as view:
        assert not view.live
        tracker = Tracker(artifacts=False, listener=view, meter=a_meter())
        asyncio.run(feed(tracker))
        assert buf.getvalue().splitlines() == ["load: 1/1 chunks, 5 rows, 0.0s busy"]
        tracker.plan("check", 1)
        with pytest.raises(RuntimeError):
            asyncio.run(tracker.run("check", broken()))
        for _ in range(2):
            asyncio.run(tracker.run("generate", finished(output("samples", 4))))
    lines = buf.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "load: 1/1 chunks",
        "check: 0/1 chunks",  # every chunk ended: one failed
        "generate: 5/5 chunks",
        "grade: 0/5 chunks",  # at the end: the stages that did not finish
        "LLM: 2 calls (1 cached)",
    ]
    assert "(1 failed)" in lines[1] and "20 rows (1 reused)" in lines[2]
    assert "\x1b" not in buf.getvalue()


class BrokenMeter(UsageMeter):
    def total(self) -> Any:
        raise ValueError("no usage today")


def test_a_failure_to_draw_never_stops_the_run_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    console, buf = text_console()
    view = LiveProgress(console, live=True)
    tracker = Tracker(artifacts=False, listener=view, meter=BrokenMeter())
    tracker.plan("s", 1)
    with caplog.at_level(logging.WARNING, logger="mathmill.progress"):
        for _ in range(3):
            assert view.render() is not None
        plain = LiveProgress(console, live=False)
        with plain:
            tracker.listener = plain
            asyncio.run(tracker.run("s", finished(output("rows", 1))))
    assert [r.getMessage() for r in caplog.records] == [
        "progress view: drawing failed (the run goes on)",  # the live view's, once
        "progress view: drawing failed (the run goes on)",  # the plain view's, once
    ]
    assert "s: 1/1 chunks" in buf.getvalue()


def test_figures_as_text() -> None:
    assert [duration(s) for s in (0, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]
    fig = StageProgress(planned=4, done=1, started=100.0)
    assert eta_text(fig, now=110.0) == "ETA 30s"
    assert eta_text(StageProgress(planned=4), now=110.0) == "ETA ?"
    assert eta_text(StageProgress(planned=2, done=2), now=0.0) == "done"
    assert eta_text(StageProgress(planned=2, done=1, failed=1), now=0.0) == "stopped"
    fig = StageProgress(planned=3, done=3, reused=2, rows=1234, busy_s=1.25)
    assert plain_line("grade", fig) == "grade: 3/3 chunks, 1,234 rows (2 reused), 1.2s busy"
    assert llm_line(None) == "" and llm_line(UsageMeter()) == ""


# -- a real run through the command line ----------------------------------------------


def _answer(request: RecordedRequest) -> Reply:
    n = int((request.body or {}).get("n") or 1)
    return Reply(contents=[f"so the answer is \\boxed{{{i}}}" for i in range(n)])


def test_a_sample_run_from_the_command_line_reports_its_progress(
    prefect_api: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefect.main  # noqa: F401  (its log handlers on pytest's stderr, not the runner's)

    from mathmill.flows import cli

    monkeypatch.delenv("MATHMILL_PROGRESS", raising=False)
    # the command line's console as on a pipe or in CI (whatever this terminal is)
    monkeypatch.setattr(cli, "console", Console(soft_wrap=True, force_terminal=False, width=120))
    seen: list[dict[str, tuple[int, int, int, int]]] = []
    calls: list[int] = []
    listen = LiveProgress.__call__

    def spy(self: LiveProgress, tracker: Tracker) -> None:
        seen.append({k: (s.planned, s.done, s.failed, s.rows) for k, s in tracker.stages.items()})
        calls.append(tracker.meter.total().calls if tracker.meter is not None else -1)
        listen(self, tracker)

    monkeypatch.setattr(LiveProgress, "__call__", spy)
    runner = CliRunner()
    out = tmp_path / "run"
    with FakeOpenAIServer(_answer) as fake:
        args = ["sample", "--input", str(PROBLEMS), "--samples", "2", "--base-url", fake.base_url]
        args += ["--model", "m", "--out", str(out)]
        done = runner.invoke(run_app(), args)
        assert done.exit_code == 0, (done.output, done.exception)
        assert seen, "the listener was never called"
        final = seen[-1]
        assert "sample" in final and final["sample"][3] == 10
        assert all(planned == ended and planned > 0 for planned, ended, _, _ in final.values())
        assert calls[-1] == len(fake.requests) == 5  # the run's meter
        lines = done.stdout.splitlines()
        for name, (planned, _, _, rows) in final.items():
            assert f"{name}: {planned}/{planned} chunks, {rows:,} rows" in done.stdout
        assert any(line.startswith("LLM: 5 calls (0 cached)") for line in lines)
        assert "5 problems, 10 samples" in done.stdout
        assert "\x1b" not in done.stdout
        assert live_listener.get() is None  # only for the run's duration

        # --no-progress or MATHMILL_PROGRESS=0: no view (a resume: every chunk reused)
        seen.clear()
        quiet = runner.invoke(run_app(), [*args, "--no-progress"])
        env = runner.invoke(run_app(), args, env={"MATHMILL_PROGRESS": "0"})
    for run in (quiet, env):
        assert run.exit_code == 0, (run.output, run.exception)
        assert "5 problems, 10 samples" in run.stdout
        assert "chunks," not in run.stdout and "LLM:" not in run.stdout
    assert seen == []


def run_app() -> Any:
    from mathmill.flows.cli import run_app as app

    return app


def test_progress_flags_and_debug() -> None:
    from mathmill.flows.cli import show_progress

    assert show_progress({"progress": True, "debug": False})
    assert not show_progress({"progress": False})
    assert not show_progress({"progress": True, "debug": True})  # tir's turns print instead
    for name in ("sample", "tir", "synthesize"):
        help_ = CliRunner().invoke(run_app(), [name, "--help"], env={"COLUMNS": "200"}, color=False)
        assert "--no-progress" in help_.output and "MATHMILL_PROGRESS" in help_.output, name


def test_progress_updates_go_in_the_background_in_order() -> None:
    """A chunk's progress update does not hold the run: updates are sent one at a time,
    the latest waiting one replacing older ones; flush waits and reports a send's error.
    """
    import asyncio

    from mathmill.pipeline.progress import Tracker

    class Recording(Tracker):
        sent: list[str]

        async def publish(self, message: str, *, finished: bool = False) -> None:
            await asyncio.sleep(0.01)
            if message == "bad":
                raise RuntimeError("API down")
            self.sent.append(message)

    async def main() -> list[str]:
        tracker = Recording(artifacts=True)
        tracker.sent, tracker.progress_id = [], "id"
        tracker.publish_soon("a")  # returns at once
        await asyncio.sleep(0)  # "a" is being sent
        for message in ("b", "c"):  # "c" replaces "b", which was waiting
            tracker.publish_soon(message)
        assert tracker.sent == []
        await tracker.flush()
        tracker.publish_soon("bad")
        with pytest.raises(RuntimeError, match="API down"):
            await tracker.flush()
        await tracker.flush()  # the error is reported once
        return tracker.sent

    assert asyncio.run(main()) == ["a", "c"]


def test_progress_artifact_is_created_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress artifact is created while the run goes on: updates wait for it and
    name it; flush reports a failed creation once, and later updates send nothing.
    """
    import asyncio

    import prefect.artifacts

    from mathmill.pipeline.progress import Tracker

    sent: list[tuple[object, float, str]] = []

    async def create(value: float, key: str, description: str) -> str:
        await asyncio.sleep(0.01)
        if key == "bad":
            raise RuntimeError("API down")
        return f"id-{key}"

    async def update(progress_id: object, value: float, description: str) -> None:
        sent.append((progress_id, value, description))

    monkeypatch.setattr(prefect.artifacts, "acreate_progress_artifact", create)
    monkeypatch.setattr(prefect.artifacts, "aupdate_progress_artifact", update)

    async def main() -> None:
        tracker = Tracker(artifacts=True)
        tracker.create_artifact("run", "starting")  # returns at once
        assert tracker.progress_id is None
        tracker.publish_soon("a")
        await tracker.flush()
        assert tracker.progress_id == "id-run" and sent == [("id-run", 0.0, "a")]
        failing = Tracker(artifacts=True)
        failing.create_artifact("bad", "starting")
        failing.publish_soon("b")
        with pytest.raises(RuntimeError, match="API down"):
            await failing.flush()
        await failing.flush()  # reported once
        await failing.publish("done", finished=True)  # no artifact: nothing sent
        assert len(sent) == 1

    asyncio.run(main())
