"""curate resume: ``kill -9`` of ``mathmill run curate`` in the middle of the solve
stage, then the same command again, pays for no finished LLM call twice and writes
what an uninterrupted run writes: no row lost, none doubled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mathmill.llm.fake_server import FakeOpenAIServer
from tests.curate_world import CurateWorld, planted_input, write_jsonl
from tests.resume_support import kill_9_midway, run_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def command(base_url: str, data: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "mathmill", "run", "curate", "--input", str(data)),
        *("--out", str(out), "--base-url", base_url, "--model", "fake"),
        *("--benchmarks", "math500,amc23,aime", "--chunk-size", "4", "--concurrency", "2"),
        *("--sandbox-timeout", "1.5", "--no-progress"),
    ]


def rows(out: Path) -> dict[str, list[tuple[str, ...]]]:
    """Every output file's rows, as comparable tuples (ids and outcomes)."""
    got: dict[str, list[tuple[str, ...]]] = {}
    curated = [json.loads(x) for x in (out / "curated.jsonl").read_text().splitlines()]
    got["curated"] = sorted(
        (r["id"], r["code"], r["leak_verdict"], str(r["rounds"])) for r in curated
    )
    for name in ("dropped", "duplicates", "contaminated", "unsolved", "leaking"):
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        got[name] = sorted((d["target_id"], d["reason"]) for d in (json.loads(x) for x in lines))
    return got


def test_kill_9_mid_solve_then_resume(prefect_api: dict[str, str], tmp_path: Path) -> None:
    planted = planted_input()
    data = write_jsonl(tmp_path / "in.jsonl", planted.rows)
    first = CurateWorld(planted.kinds)
    with FakeOpenAIServer(first) as fake:
        whole = subprocess.run(
            command(fake.base_url, data, tmp_path / "whole"),
            env=run_env(prefect_api),
            capture_output=True,
            text=True,
        )
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = rows(tmp_path / "whole")
    assert expected["curated"]

    world = CurateWorld(planted.kinds)
    with FakeOpenAIServer(world) as fake:
        kill_9_midway(
            command(fake.base_url, data, tmp_path / "run"),
            run_env(prefect_api),
            ready=lambda: world.stages["solve.code"] + world.stages["solve.repair"] >= 14,
            paused=world.paused,
        )
        killed_at = dict(world.stages)
        resumed = subprocess.run(
            command(fake.base_url, data, tmp_path / "run"),
            env=run_env(prefect_api),
            capture_output=True,
            text=True,
        )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    solve_calls = first.stages["solve.code"] + first.stages["solve.repair"]
    assert killed_at["solve.code"] + killed_at.get("solve.repair", 0) < solve_calls  # mid-solve
    assert world.paid_twice() == {}
    assert rows(tmp_path / "run") == expected
    manifest: dict[str, Any] = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["result"]["usage"]["total"]["cached"] > 0  # the killed run's calls replayed
