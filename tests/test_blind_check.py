"""synthesize's checks of a verified chain of thought by what does not follow it: the
blind program (written from the problem alone) and the majority among the problem's
chains of thought. Real HTTP to the scripted world (tests/synth_world.py), the real
sandbox, Parquet on disk; the stages run as plain functions (``prefect=False``).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mathmill.flows.synthesize import SynthesizeParams, SynthesizeResult, plan, run_synthesize
from mathmill.llm.fake_server import FakeOpenAIServer
from mathmill.records import Attempt, SolutionRow
from mathmill.storage import RunStore
from mathmill.tasks.crosscheck import majority_answer
from tests.synth_world import SynthWorld
from tests.test_synthesize import world_config

pytestmark = pytest.mark.timeout(300)

KINDS = ("ok", "wrongcot", "split")  # 6 problems, 3 chains of thought each
NUMBERS = re.compile(r"Let a = (\d+), b = (\d+) and c = (\d+)")


@dataclass
class Synth:
    result: SynthesizeResult
    store: RunStore
    world: SynthWorld
    out: Path

    def rows(self) -> list[SolutionRow]:
        return [
            *self.store.dataset("verified").read_all(SolutionRow),
            *self.store.dataset("unverified").read_all(SolutionRow),
        ]

    def stages(self) -> Counter[str]:
        """LLM calls answered, by stage."""
        return Counter(key.split("|", 1)[0] for key in self.world.served)


def synth(out: Path, world: SynthWorld, **extra: Any) -> Synth:
    """A run of ``world``: one topic per kind, 2 problems each, 2 short CoTs."""
    fields = {"topics": len(world.kinds), "short_cots": 2} | extra
    with FakeOpenAIServer(world) as fake:
        cfg = world_config(fake.base_url, str(out), **fields)
        result = asyncio.run(run_synthesize(cfg, prefect=False))
    return Synth(result, RunStore(str(out)), world, out)


def truth(statement: str) -> int:
    m = NUMBERS.search(statement)
    assert m, statement
    a, b, c = (int(x) for x in m.groups())
    return a * b + c


def kind(row: SolutionRow) -> str:
    return row.problem.split("]")[0].lstrip("[")


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    """The defaults: blind check on, majority off."""
    return synth(tmp_path_factory.mktemp("blind") / "run", SynthWorld(kinds=KINDS))


def test_a_wrong_cot_its_own_code_reproduces_is_caught_by_the_blind_program(
    checked: Synth, tmp_path: Path
) -> None:
    rows = checked.rows()
    wrong = [r for r in rows if kind(r) == "wrongcot"]
    assert len(wrong) == 6
    for row in wrong:
        right = truth(row.problem)
        assert row.status == "disagreement"
        assert row.computed_answer == row.final_answer == str(right + 1)  # its code agreed
        assert row.blind_answer == str(right)
        assert row.reason == (
            f"the chain of thought's answer {right + 1} differs from {right}, "
            "computed by a program written from the problem alone"
        )
    # without the blind check, the same chains of thought verify
    unchecked = synth(tmp_path / "unchecked", SynthWorld(kinds=KINDS), blind_check=False)
    assert {r.status for r in unchecked.rows() if kind(r) == "wrongcot"} == {"verified"}
    assert unchecked.result.verified == 18 and unchecked.result.unverified == 0
    assert not any(s.startswith("blind.") for s in unchecked.stages())
    assert all(r.blind_answer is None for r in unchecked.rows())
    assert not any(k.startswith("verify.blind") for k in unchecked.result.counts)


def test_a_failed_check_is_the_verdict_of_the_lineages_last_round(checked: Synth) -> None:
    attempts = {a.id: a for a in checked.store.dataset("attempts").read_all(Attempt)}
    for row in checked.store.dataset("unverified").read_all(SolutionRow):
        last = attempts[row.lineage[-1]]
        assert last.verdict is not None and last.verdict.status == "disagreement"
        assert last.verdict.rule == "blind_check" and last.verdict.reason == row.reason
        assert (last.verdict.expected, last.verdict.predicted) == (
            row.final_answer,
            row.blind_answer,
        )
        assert last.execution is not None and last.code  # the code check's work stays


def test_the_blind_check_keeps_right_cots_and_counts_what_it_did(checked: Synth) -> None:
    rows = checked.rows()
    by_status = Counter((kind(r), r.status) for r in rows)
    assert by_status == {
        ("ok", "verified"): 6,
        ("wrongcot", "disagreement"): 6,
        ("split", "verified"): 4,
        ("split", "disagreement"): 2,  # the wrong short chain of thought of each problem
    }
    counts = checked.result.counts
    assert counts["verify.blind_problems"] == 6  # one program per problem, not per CoT
    assert counts["verify.blind_agreed"] == 10
    assert counts["verify.unverified.disagreement"] == 8
    assert "verify.blind_inconclusive" not in counts
    assert (checked.result.verified, checked.result.unverified) == (10, 8)
    assert checked.stages()["blind.code"] == 6 and checked.stages()["blind.repair"] == 0
    report = (checked.out / "report.md").read_text()
    assert "| verify | unverified.disagreement | 8 |" in report
    assert "| verify | blind_agreed | 10 |" in report
    for row in rows:
        assert row.blind_answer == str(truth(row.problem))
    for row in checked.store.dataset("verified").read_all(SolutionRow):
        assert {"synth_code", "curate_solve"} <= set(row.prompts)


def test_blind_attempts_are_kept_for_audit(checked: Synth) -> None:
    attempts = checked.store.dataset("attempts").read_all(Attempt)
    blind = [a for a in attempts if a.metadata.get("step") == "blind"]
    assert len(blind) == 6 and len({a.problem_id for a in blind}) == 6
    for a in blind:
        assert a.kind == "code" and a.round == 0 and a.parent_id is None
        assert a.prompt is not None and a.prompt.template_id == "curate_solve"
        assert a.code and a.execution is not None and a.execution.status == "ok"
        assert a.verdict is not None and a.verdict.status == "unvalidated"
        assert a.verdict.predicted == a.final_answer


def test_majority_unverifies_a_verified_minority_answer_only_when_on(tmp_path: Path) -> None:
    world = SynthWorld(kinds=KINDS)
    on = synth(tmp_path / "on", world, blind_check=False, majority=True)
    minority = [r for r in on.rows() if r.status == "minority"]
    assert len(minority) == 2 and {kind(r) for r in minority} == {"split"}
    for row in minority:
        right = truth(row.problem)
        assert row.cot_type == "short_cot" and row.final_answer == str(right + 1)
        assert row.reason == (
            f"the chain of thought's answer {right + 1} is not the majority answer {right} "
            "of the problem's 3 chains of thought"
        )
    attempts = {a.id: a for a in on.store.dataset("attempts").read_all(Attempt)}
    for row in minority:
        verdict = attempts[row.lineage[-1]].verdict
        assert verdict is not None and (verdict.status, verdict.rule) == ("minority", "majority")
    # every chain of thought of a wrongcot problem agrees: the majority cannot tell
    assert {r.status for r in on.rows() if kind(r) == "wrongcot"} == {"verified"}
    assert on.result.counts["verify.unverified.minority"] == 2
    assert (on.result.verified, on.result.unverified) == (16, 2)
    assert "| verify | unverified.minority | 2 |" in (on.out / "report.md").read_text()
    # one long and one short chain of thought that differ: a tie, no majority
    tie = synth(tmp_path / "tie", world, blind_check=False, majority=True, short_cots=1)
    assert {r.status for r in tie.rows()} == {"verified"}
    assert "verify.unverified.minority" not in tie.result.counts


def test_a_blind_program_without_an_answer_leaves_the_row_verified(tmp_path: Path) -> None:
    got = synth(tmp_path / "run", SynthWorld(kinds=("ok",), blind="crash"), topics=1)
    rows = got.rows()
    assert len(rows) == 6 and {r.status for r in rows} == {"verified"}
    assert all(r.blind_answer is None for r in rows)
    assert got.result.counts["verify.blind_inconclusive"] == 6
    assert "verify.blind_agreed" not in got.result.counts
    blind = [
        a
        for a in got.store.dataset("attempts").read_all(Attempt)
        if a.metadata.get("step") == "blind"
    ]
    by_problem = Counter(a.problem_id for a in blind)
    assert by_problem == {pid: 3 for pid in by_problem} and len(by_problem) == 2  # 2 repairs
    assert all(a.verdict is not None and a.verdict.status == "error" for a in blind)


def test_a_failed_blind_program_is_repaired_and_the_lineage_is_kept(tmp_path: Path) -> None:
    got = synth(tmp_path / "run", SynthWorld(kinds=("ok", "wrongcot"), blind="repair"), topics=2)
    assert got.result.counts["verify.blind_agreed"] == 6
    assert got.result.counts["verify.unverified.disagreement"] == 6
    attempts = got.store.dataset("attempts").read_all(Attempt)
    blind = sorted(
        (a for a in attempts if a.metadata.get("step") == "blind"),
        key=lambda a: (a.problem_id, a.round),
    )
    assert len(blind) == 8
    for first, second in zip(blind[::2], blind[1::2], strict=True):
        assert first.problem_id == second.problem_id and second.parent_id == first.id
        assert first.verdict is not None and first.verdict.status == "error"
        assert second.prompt is not None and second.prompt.template_id == "curate_repair"
        assert second.verdict is not None and second.verdict.status == "unvalidated"


def test_majority_answer_groups_equivalent_answers_and_a_tie_has_none() -> None:
    assert majority_answer(["1/2", "0.5", "3"]) == "1/2"
    assert majority_answer(["1", "2", "2", "1"]) is None
    assert majority_answer(["7"]) == "7"
    assert majority_answer([]) is None


def test_the_plan_counts_the_blind_programs() -> None:
    on = SynthesizeParams(topics=2, problems_per_topic=1, short_cots=0, rounds=2)
    off = on.model_copy(update={"blind_check": False})
    assert plan(on).max_llm_calls - plan(off).max_llm_calls == 2 * (1 + 2)
