"""The dataset report (mathmill/report): report.html and its charts for real synthesize
and tir runs (a real Prefect server, the fake OpenAI server, the real sandbox), its
Prefect artifacts, `mathmill report DIR` on local disk and S3, and each chart on
synthetic figures (no data, no chart).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mathmill.report import charts
from mathmill.report.data import RunData
from tests.prefect_support import artifacts

pytestmark = pytest.mark.timeout(600)

PNG = b"\x89PNG\r\n\x1a\n"


def check_report(out: Path, expect: set[str]) -> str:
    """report.html's charts all exist, are real PNGs, and the page names each title."""
    page = (out / "report.html").read_text("utf-8")
    srcs = re.findall(r'<img src="(report/[a-z_]+\.png)"', page)
    names = {Path(s).stem for s in srcs}
    assert expect <= names, names
    by_name = {c.name: c for c in charts.CHARTS}
    for src in srcs:
        data = (out / src).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000, (src, len(data))
        assert by_name[Path(src).stem].title in page
    return page


# -- real runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_run(prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mathmill.flows.synthesize import synthesize
    from mathmill.llm.fake_server import FakeOpenAIServer
    from tests.synth_world import SynthWorld
    from tests.test_synthesize import world_config

    out = tmp_path_factory.mktemp("report-synth") / "run"
    world = SynthWorld(kinds=("ok", "fix", "stuck", "crash", "noanswer"))
    with FakeOpenAIServer(world) as fake:
        cfg = world_config(fake.base_url, str(out), topics=5)
        state = asyncio.run(synthesize(params=cfg, return_state=True))
        return out, state.result(), state.state_details.flow_run_id


@pytest.mark.slow
def test_a_synthesize_run_writes_its_report_and_artifacts(synth_run: Any) -> None:
    out, result, flow_run_id = synth_run
    page = check_report(out, {"rows", "failures", "rounds", "lengths", "usage"})
    assert result.outputs["report.html"] == str(out / "report.html")
    assert "synthesize run: dataset report" in page
    assert "wrong_answer" not in page  # reasons are in the charts, not the page
    (markdown,) = artifacts(flow_run_id, "synthesize-dataset-report")
    assert "| verified |" in str(markdown.data) and "report.html" in str(markdown.data)
    (link,) = artifacts(flow_run_id, "synthesize-report-html")
    assert str(link.data).endswith("report.html)") or "report.html" in str(link.data)
    (image,) = artifacts(flow_run_id, "synthesize-report-chart")
    assert str(image.data).startswith("data:image/png;base64,")


@pytest.mark.slow
def test_a_tir_run_charts_turns_code_runs_and_errors(
    prefect_api: dict[str, str], tmp_path: Path
) -> None:
    from mathmill.flows.tir import tir
    from mathmill.llm.fake_server import FakeOpenAIServer
    from tests.test_tir import handler, params

    with FakeOpenAIServer(handler) as fake:
        state = asyncio.run(tir(params=params(fake.base_url, tmp_path), return_state=True))
    out = tmp_path / "run"
    page = check_report(out, {"rows", "tir", "pass_rates", "failures"})
    assert "Tool use per trajectory" in page
    (markdown,) = artifacts(state.state_details.flow_run_id, "tir-dataset-report")
    assert "accuracy of the validated" in str(markdown.data)


@pytest.mark.slow
def test_the_command_re_renders_a_run_directory(synth_run: Any, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(synth_run[0], out)
    shutil.rmtree(out / "report")
    (out / "report.html").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "mathmill", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out / "report.html")
    check_report(out, {"rows", "failures", "rounds", "lengths", "usage"})
    missing = subprocess.run(
        [sys.executable, "-m", "mathmill", "report", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().endswith("not a mathmill run directory")


@pytest.mark.slow
def test_the_report_of_a_run_on_s3(synth_run: Any, s3_store: Any) -> None:
    from mathmill.report import render_report

    local = Path(synth_run[0])
    for path in local.rglob("*"):  # the run directory, copied to the bucket
        rel = path.relative_to(local).as_posix()
        if path.is_file() and not rel.startswith((".", "report")):
            s3_store.write_bytes(rel, path.read_bytes())
    files = render_report(s3_store)
    assert next(iter(files)) == "report.html"
    assert files["report.html"] == f"{s3_store.url}/report.html"
    page = s3_store.read_bytes("report.html").decode()
    for name in ("rows", "failures", "rounds", "lengths", "usage"):
        assert f'src="report/{name}.png"' in page
        assert s3_store.read_bytes(f"report/{name}.png").startswith(PNG)


# -- the charts on synthetic figures -----------------------------------------------------


def full() -> RunData:
    return RunData(
        url="/tmp/x",
        pipeline="curate",
        status="complete",
        result={"curated": 3, "wall_s": 1.5, "stats": {"success rate": "50.0%"}},
        counts={"load.problems": 10, "solve.unsolved.error": 2, "solve.solved_round_0": 8},
        usage={
            "solve": {"prompt_tokens": 100, "completion_tokens": 50, "cost_usd": 0.01},
            "total": {"calls": 3, "prompt_tokens": 100, "completion_tokens": 50},
        },
        stages=["load", "solve"],
        datasets={"curated": 3},
        lengths={"verified": [10, 20, 30], "wrong_answer": [5]},
        failures=Counter({"wrong_answer": 3, "timeout <script>": 1}),
        rounds={"verified": Counter({0: 3, 1: 1}), "unverified": Counter({2: 1})},
        pass_rates={"a": (3, 4), "b": (1, 4)},
        buckets=Counter({"easy": 3, "hard": 1}),
        difficulty=[0.1, 0.5, 0.9],
        domains=Counter({"algebra": 3, "geometry": 1}),
        structure=Counter({"technique: induction": 2}),
        tir=[(2, 1, 0), (3, 2, 1)],
    )


def test_every_chart_draws_a_png_with_data_and_none_without() -> None:
    empty = RunData(url="/tmp/x", pipeline="sample", status="complete")
    data = full()
    for chart in charts.CHARTS:
        assert chart.draw(empty) is None, chart.name
        png = chart.draw(data)
        assert png is not None and png.startswith(PNG) and len(png) > 5_000, chart.name
    assert charts.render_charts(empty) == []


def test_partial_data_draws_only_what_it_has() -> None:
    data = RunData(url="/tmp/x", pipeline="sample", status="complete")
    data.difficulty = [0.2, 0.4]  # no buckets: one panel
    data.usage = {"gen": {"prompt_tokens": 0, "completion_tokens": 0}}  # no tokens
    data.lengths = {"correct": []}
    drawn = {c.name for c, _ in charts.render_charts(data)}
    assert drawn == {"difficulty"}


def test_the_page_escapes_text_and_lists_key_figures() -> None:
    from mathmill.report.html import key_figures_markdown, report_html

    data = full()
    data.pipeline = "<b>curate</b>"
    drawn = charts.render_charts(data)
    page = report_html(data, [(c, f"report/{c.name}.png") for c, _ in drawn])
    assert "<b>curate</b>" not in page and "&lt;b&gt;curate&lt;/b&gt;" in page
    assert "<script" not in page
    assert "<span>curated</span>" in page and "<span>success rate</span>" in page
    markdown = key_figures_markdown(data, "/tmp/x/report.html")
    assert "| curated | 3 |" in markdown and "`/tmp/x/report.html`" in markdown
