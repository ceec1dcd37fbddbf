"""The leak check and repair of curated solutions (the AIMO pipeline's stage 5).

The AST detector (:func:`~mathmill.grading.leaks.detect_leak`) flags a program that
looks like it hard-codes the answer. A flagged program goes to an LLM judge, which
confirms or clears it (its reason is kept: a constant stated in the problem is not a
leak). A confirmed leak gets repair rounds ("compute it, don't print it"): the
rewritten program is run, graded and checked again. Still leaking, or no longer
right: the row goes to the ``leaking`` side output with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from mathmill.grading.leaks import detect_leak
from mathmill.pipeline.chunks import Runtime, drop
from mathmill.prompts import load_prompt
from mathmill.records import Attempt, CuratedRow, Dropped, ErrorInfo, Verdict
from mathmill.tasks.solve import SolveConfig, ask_for_code, grade_attempt

__all__ = ["LeakConfig", "LeakJudgement", "LeakOutcome", "check_row"]


class LeakJudgement(BaseModel):
    """The judge's structured reply (lenient: a weak model may omit the reason)."""

    leak: bool = True
    reason: str = ""


class LeakConfig(BaseModel):
    """The leak check's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Run the leak check at all.")
    judge: bool = Field(True, description="Ask the judge about a flagged program.")
    rounds: int = Field(1, ge=0, le=5, description="Repair rounds for a confirmed leak.")
    solve: SolveConfig = Field(default_factory=SolveConfig)


@dataclass
class LeakOutcome:
    """One row's outcome: kept (maybe repaired) or dropped, and the new attempts."""

    row: CuratedRow | None = None
    dropped: Dropped | None = None
    attempts: list[Attempt] = field(default_factory=list)
    error: ErrorInfo | None = None
    outcome: str = "clean"


async def _judge(
    rt: Runtime, row: CuratedRow, code: str, signals: list[str]
) -> tuple[bool, str, ErrorInfo | None]:
    """(leak, reason, error): a failed judge counts as a confirmed leak (cautious)."""
    prompt = load_prompt("curate_leak_judge")
    text = prompt.render(
        problem=row.problem, answer=row.answer, code=code, signals="; ".join(signals) or "none"
    )
    got = await rt.client("judge").structured(
        [{"role": "user", "content": text}],
        LeakJudgement,
        stage="leaks.judge",
        raise_on_error=False,
    )
    if got.value is None:
        for error in (got.result.error, got.error):  # the call's own failure first
            if error is not None and error.transient:
                return True, "", error
        error = got.error or got.result.error
        return True, f"the judge gave no verdict ({error.message if error else 'no reply'})", None
    return got.value.leak, got.value.reason.strip(), None


async def _confirmed(
    rt: Runtime, cfg: LeakConfig, row: CuratedRow, code: str
) -> tuple[bool, bool, str, ErrorInfo | None]:
    """(flagged, leak, reason, error) for ``code``: the detector, then the judge."""
    report = detect_leak(code, row.answer)
    if not report.leak:
        return False, False, "", None
    reasons = "; ".join(report.reasons)
    if not cfg.judge:
        return True, True, f"static check: {reasons}", None
    leak, why, error = await _judge(rt, row, code, report.reasons)
    return True, leak, why or reasons, error


async def _repair(
    rt: Runtime, cfg: LeakConfig, row: CuratedRow, code: str, reason: str, parent: str | None
) -> Attempt:
    """One "compute it, don't print it" round, run and graded."""
    prompt = load_prompt("curate_leak_repair")
    attempt = await ask_for_code(
        rt,
        "solver",
        prompt.ref,
        prompt.render(problem=row.problem, code=code, reason=reason),
        problem_id=row.id,
        sampling=cfg.solve.sampling,
        stage="leaks.repair",
        salt=f"leak:{row.id}:{parent}",
        sample_index=row.sample_index,
        round_=row.rounds + 1,
        parent_id=parent,
        metadata={"step": "leak_repair", "role": "solver", "leak_reason": reason},
    )
    return await grade_attempt(rt, cfg.solve, attempt, row.answer, "leaks")


async def check_row(rt: Runtime, cfg: LeakConfig, row: CuratedRow) -> LeakOutcome:
    """Check one solved row; repair a confirmed leak; say what became of it."""
    if not cfg.enabled:
        return LeakOutcome(row=row, outcome="unchecked")
    flagged, leak, reason, error = await _confirmed(rt, cfg, row, row.code)
    if error is not None:
        return LeakOutcome(error=error, outcome="judge_error")
    if not flagged:
        return LeakOutcome(row=row)
    if not leak:
        kept = row.model_copy(
            update={"leak_flagged": True, "leak_verdict": "cleared", "leak_reason": reason}
        )
        return LeakOutcome(row=kept, outcome="cleared")
    out = LeakOutcome(outcome="leaking")
    code, parent, current = row.code, row.lineage[-1] if row.lineage else None, row
    for _ in range(cfg.rounds):
        attempt = await _repair(rt, cfg, current, code, reason, parent)
        out.attempts.append(attempt)
        if attempt.error is not None and attempt.error.transient:
            out.error = attempt.error
            return out
        verdict = attempt.verdict or Verdict(status="failed", reason="not graded")
        if verdict.status != "verified" or attempt.code is None:
            reason = f"the repaired program failed ({verdict.status}: {verdict.reason})"
            break
        flagged, leak, why, error = await _confirmed(rt, cfg, row, attempt.code)
        if error is not None:
            out.error = error
            return out
        if not leak:
            out.row = current.model_copy(
                update={
                    "code": attempt.code,
                    "computed_answer": verdict.predicted,
                    "rounds": attempt.round,
                    "lineage": [*current.lineage, attempt.id],
                    "leak_flagged": True,
                    "leak_verdict": "repaired",
                    "leak_reason": reason,
                    "prompt_tokens": current.prompt_tokens + attempt.usage.prompt_tokens,
                    "completion_tokens": current.completion_tokens
                    + attempt.usage.completion_tokens,
                }
            )
            out.outcome = "repaired"
            return out
        code, parent, reason = attempt.code, attempt.id, why
        current = current.model_copy(
            update={
                "rounds": attempt.round,
                "lineage": [*current.lineage, attempt.id],
                "prompt_tokens": current.prompt_tokens + attempt.usage.prompt_tokens,
                "completion_tokens": current.completion_tokens + attempt.usage.completion_tokens,
            }
        )
    out.dropped = drop("leaks", "leak", row, row.id, reason)
    return out
