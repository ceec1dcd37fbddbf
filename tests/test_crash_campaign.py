"""The crash campaign in CI: three seeded kill points per pipeline (one during
start-up, two after a random number of answered requests), each followed by a re-run
that must write the rows of an uninterrupted run and pay for no finished call twice.
``bench/chaos.py`` runs the same code with 20 kill points per pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos_support import Pipeline, campaign, pipelines, run_env, table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

KILLS = 3


@pytest.mark.parametrize("name", ["synthesize", "tir", "sample"])
def test_kill_9_at_random_points_then_resume(
    prefect_api: dict[str, str], tmp_path: Path, name: str
) -> None:
    chosen: list[Pipeline] = [p for p in pipelines(tmp_path / "inputs") if p.name == name]
    lines: list[str] = []
    (report,) = campaign(
        chosen, tmp_path, run_env(prefect_api), kills=KILLS, seed=0, log=lines.append
    )
    summary = "\n".join([*lines, table([report])])
    assert len(report.outcomes) == KILLS
    assert report.outcomes[0].point.requests == 0  # one kill during start-up
    assert any(o.answered_before_kill > 0 for o in report.outcomes), summary
    for outcome in report.outcomes:
        assert outcome.ok, f"{outcome.point}: {outcome.problem}\n{summary}"
        assert outcome.finished_paid_twice == 0 and (outcome.lost, outcome.doubled) == (0, 0)
        assert outcome.survivors == []
