"""The verify stage's chunk: every chain of thought verified by its own code
(:mod:`mathmill.tasks.verify`), then cross-checked by what does not follow it.

Code written *from* a chain of thought reproduces its answer even when the reasoning
is wrong, so a verified row is checked further:

* **blind check** (``VerifyConfig.blind_check``, on by default): per problem, the coder
  writes a program from the problem alone, blind to every chain of thought
  (:func:`mathmill.tasks.solve.solve_lineage`, with its own repair rounds for an error,
  a timeout or no output), and the sandbox runs it. A verified row whose answer is not
  equivalent to the printed one (:func:`~mathmill.grading.reference.check_answer`)
  becomes ``disagreement``. A blind program with no answer after its rounds decides
  nothing: the row stays verified, counted ``verify.blind_inconclusive``. The program
  is written once per problem, only for problems with a verified row.
* **majority** (``VerifyConfig.majority``, off by default): a verified row whose
  answer is not the majority answer among its problem's chains of thought (the last
  round of each lineage, long and short, classes of equivalent answers) becomes
  ``minority``. A tie is no majority and decides nothing.

Neither failure gets a rewrite round. A failed check's verdict (rule ``blind_check``
or ``majority``; ``expected``: the chain of thought's answer, ``predicted``: the blind
or majority answer) replaces the code check's on the lineage's last round, as the leak
check's does, so a row's status is its last attempt's. The blind programs' attempts
(``kind="code"``, ``metadata["step"] == "blind"``) join the chunk's attempts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mathmill.grading.reference import check_answer
from mathmill.pipeline.chunks import Runtime, map_rows
from mathmill.records import Attempt, ErrorInfo, Problem, SolutionRow, Verdict
from mathmill.tasks.solve import SolveConfig, solve_lineage
from mathmill.tasks.verify import VerifyConfig, solution_row, verify_lineage

__all__ = [
    "BLIND_STAGE",
    "VerifyRows",
    "blind_answer",
    "blind_lineages",
    "cross_check",
    "majority_answer",
    "verify_chunk",
]

BLIND_STAGE = "blind"
"""The blind program's stage name: its calls are ``blind.code`` and ``blind.repair``."""


@dataclass
class VerifyRows:
    """A verified chunk: every round, the verified and unverified rows, counts."""

    attempts: list[Attempt]
    verified: list[SolutionRow]
    unverified: list[SolutionRow]
    counts: Counter[str]
    errors: list[ErrorInfo]


def blind_config(cfg: VerifyConfig) -> SolveConfig:
    """The blind program's settings: the coder's sampling, the sandbox limits, and as
    many repair rounds as a chain of thought gets rewrite rounds.
    """
    return SolveConfig(
        rounds=cfg.rounds,
        samples=1,
        limits=cfg.limits,
        sampling=cfg.code_sampling,
        leak_check=False,  # no reference answer to look for
    )


async def blind_lineages(
    rt: Runtime, cfg: VerifyConfig, problems: Sequence[Problem]
) -> dict[str, list[Attempt]]:
    """Per problem id, the attempts of a program the coder writes from the problem
    alone (its reference answer withheld) and its repair rounds; problems run
    concurrently.
    """
    solve_cfg = blind_config(cfg)

    async def one(problem: Problem) -> list[Attempt]:
        blind = problem.model_copy(update={"answer": None})
        return await solve_lineage(rt, solve_cfg, blind, role="coder", stage=BLIND_STAGE)

    lineages = await map_rows(problems, one, rt.row_concurrency)
    return {p.id: lineage for p, lineage in zip(problems, lineages, strict=True)}


def blind_answer(lineage: Sequence[Attempt]) -> str | None:
    """What the blind program printed, or None when it gave no answer after its
    rounds (an error, a timeout, no output, no code, an LLM error).
    """
    verdict = lineage[-1].verdict if lineage else None
    if verdict is None or verdict.status != "unvalidated":
        return None
    return verdict.predicted


def _same(a: str, b: str, problem: str | None) -> bool:
    return check_answer(a, b, problem=problem).status == "correct"


def majority_answer(answers: Sequence[str], problem: str | None = None) -> str | None:
    """The answer of the largest class of equivalent answers, or None on a tie (or
    with no answers).

    >>> majority_answer(["12", "15", "12.0"])
    '12'
    >>> majority_answer(["12", "15"]) is None
    True
    """
    classes: list[list[str]] = []
    for answer in answers:
        for members in classes:
            if _same(members[0], answer, problem):
                members.append(answer)
                break
        else:
            classes.append([answer])
    sizes = sorted((len(c) for c in classes), reverse=True)
    if not sizes or (len(sizes) > 1 and sizes[0] == sizes[1]):
        return None
    return max(classes, key=len)[0]


def _disagreement(answer: str, blind: str) -> Verdict:
    reason = (
        f"the chain of thought's answer {answer} differs from {blind}, "
        "computed by a program written from the problem alone"
    )
    return Verdict(
        status="disagreement", expected=answer, predicted=blind, rule="blind_check", reason=reason
    )


def _minority(answer: str, majority: str, votes: int) -> Verdict:
    reason = (
        f"the chain of thought's answer {answer} is not the majority answer "
        f"{majority} of the problem's {votes} chains of thought"
    )
    return Verdict(
        status="minority", expected=answer, predicted=majority, rule="majority", reason=reason
    )


def _failed(row: SolutionRow, verdict: Verdict) -> tuple[SolutionRow, Verdict]:
    return row.model_copy(update={"status": verdict.status, "reason": verdict.reason}), verdict


def _with_blind_prompts(row: SolutionRow, lineage: Sequence[Attempt]) -> SolutionRow:
    prompts = dict(row.prompts)
    for a in lineage:
        if a.prompt is not None:
            prompts[a.prompt.template_id] = a.prompt.sha256
    return row.model_copy(update={"prompts": prompts})


def _check_row(
    row: SolutionRow,
    statement: str,
    lineage: Sequence[Attempt] | None,
    top: str | None,
    votes: int,
    counts: Counter[str],
) -> tuple[SolutionRow, Verdict | None]:
    """One row after the blind check (``lineage``: its problem's blind program, if
    any) and the majority check (``top``: the majority answer, if checked and any),
    with the verdict of the check it failed.
    """
    answer = blind_answer(lineage) if lineage else None
    if lineage:
        row = row.model_copy(update={"blind_answer": answer})
    mine = row.final_answer
    if row.status != "verified" or mine is None:
        return row, None
    if lineage:
        row = _with_blind_prompts(row, lineage)
        if answer is None:
            counts["verify.blind_inconclusive"] += 1
        elif not _same(mine, answer, statement):
            return _failed(row, _disagreement(mine, answer))
        else:
            counts["verify.blind_agreed"] += 1
    if top is not None and not _same(top, mine, statement):
        return _failed(row, _minority(mine, top, votes))
    return row, None


def cross_check(
    rows: Sequence[SolutionRow],
    problems: dict[str, Problem],
    blind: dict[str, list[Attempt]],
    *,
    majority: bool,
    counts: Counter[str],
) -> list[tuple[SolutionRow, Verdict | None]]:
    """``rows`` after the blind check (for the problems in ``blind``) and, with
    ``majority``, the majority check, in order, each with the verdict of the check it
    failed (None: it failed none). Only verified rows can fail them; every row of a
    blind-checked problem gets its ``blind_answer``. Counts
    ``verify.blind_agreed`` and ``verify.blind_inconclusive`` (verified rows the blind
    program agreed with, or gave no answer for) into ``counts``.
    """
    answers: dict[str, list[str]] = {}
    for row in rows:
        if row.final_answer is not None:
            answers.setdefault(row.problem_id, []).append(row.final_answer)
    tops: dict[str, str | None] = {}
    if majority:
        tops = {
            pid: majority_answer(given, problems[pid].statement) for pid, given in answers.items()
        }
    return [
        _check_row(
            row,
            problems[row.problem_id].statement,
            blind.get(row.problem_id),
            tops.get(row.problem_id),
            len(answers.get(row.problem_id, [])),
            counts,
        )
        for row in rows
    ]


async def verify_chunk(
    rt: Runtime, cfg: VerifyConfig, problems: list[Problem], cots: list[Attempt]
) -> VerifyRows:
    """Verify every chain of thought of a chunk (lineages run concurrently), then
    cross-check the verified rows (the blind program of each problem with a verified
    row, concurrently across problems; the majority).
    """
    by_id = {p.id: p for p in problems}

    async def one(cot: Attempt) -> list[Attempt]:
        return await verify_lineage(rt, cfg, by_id[cot.problem_id], cot)

    lineages = await map_rows(cots, one, rt.row_concurrency)
    out = VerifyRows([], [], [], Counter(), [])
    rows = [solution_row(by_id[rounds[0].problem_id], rounds) for rounds in lineages]
    blind: dict[str, list[Attempt]] = {}
    if cfg.blind_check:
        checked = {r.problem_id for r in rows if r.status == "verified"}
        blind = await blind_lineages(rt, cfg, [p for p in problems if p.id in checked])
        if blind:
            out.counts["verify.blind_problems"] += len(blind)
    crossed = cross_check(rows, by_id, blind, majority=cfg.majority, counts=out.counts)
    for rounds, (row, failed) in zip(lineages, crossed, strict=True):
        if failed is not None:  # the last round's verdict is the check's, as the row's
            rounds[-1] = rounds[-1].model_copy(update={"verdict": failed})
        out.attempts.extend(rounds)
        out.counts["verify.rewrites"] += len(rounds) - 1
        out.errors.extend(a.error for a in rounds[-1:] if a.error is not None)
        if row.status == "verified":
            out.verified.append(row)
            out.counts[f"verify.verified_round_{row.rounds}"] += 1
        else:
            out.unverified.append(row)
            out.counts[f"verify.unverified.{row.status}"] += 1
    for lineage in blind.values():
        out.attempts.extend(lineage)
        out.errors.extend(a.error for a in lineage[-1:] if a.error is not None)
    return out
