"""Execution verification of chains of thought, and the feedback-rewrite loop.

For one chain of thought: the coder turns it into Python, the critic reviews the
code against it, the coder regenerates the code from the review, the sandbox runs
it, the grader compares the computed answer with the chain of thought's answer, and
the leak check rejects code that only prints the answer. Each step's output stays on
the attempt. A failed attempt is rewritten from its critique and execution result
and verified again, up to ``rounds`` times; every round is kept, linked by
``parent_id``.

A chunk's lineages, and the checks of a verified row by what does not follow its chain
of thought (the blind program, the majority), are in :mod:`mathmill.tasks.crosscheck`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from mathmill.grading.coderun import check_code
from mathmill.grading.extract import extract_answer
from mathmill.grading.leaks import detect_leak
from mathmill.llm.client import ChatResult
from mathmill.pipeline.chunks import Runtime
from mathmill.prompts import load_prompt
from mathmill.records import (
    Attempt,
    Critique,
    ErrorInfo,
    ExecutionResult,
    Problem,
    SamplingParams,
    SolutionRow,
    TokenUsage,
    Verdict,
    VerdictStatus,
)
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import SandboxError

__all__ = [
    "VerifyConfig",
    "extract_code",
    "solution_row",
    "verify_attempt",
    "verify_lineage",
]

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)[ \t]*\n(.*)\Z", re.DOTALL | re.IGNORECASE)
FAILURES_TO_REWRITE: frozenset[str] = frozenset(
    {"wrong_answer", "no_answer", "no_code", "error", "timeout", "no_output", "leak"}
)


def extract_code(reply: str) -> str | None:
    """The last fenced Python block of a reply (an unclosed final fence counts).

    >>> extract_code("Here:\\n```python\\nprint(2)\\n```")
    'print(2)'
    """
    blocks: list[str] = [b.strip() for b in _FENCE.findall(reply) if b.strip()]
    if blocks:
        return blocks[-1]
    if m := _OPEN_FENCE.search(reply):
        code: str = m.group(1).strip()
        return code or None
    return None


class CritiqueReply(BaseModel):
    """The critic's structured review (lenient: a weak model may omit fields)."""

    summary: str = ""
    alignment: float | None = None
    rigor: float | None = None
    complexity: float | None = None
    edge_cases: list[str] = Field(default_factory=list)
    issues: list[str] = Field(default_factory=list)
    passed: bool | None = None


class VerifyConfig(BaseModel):
    """The verification and rewrite settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(ge=0, le=10, description="Rewrite rounds for a failed attempt.")
    regenerate: bool = Field(True, description="Regenerate the code from the critique.")
    leak_check: bool = True
    limits: Limits = Field(default_factory=Limits)
    code_sampling: SamplingParams
    critic_sampling: SamplingParams
    rewrite_sampling: SamplingParams
    blind_check: bool = Field(
        True,
        description="Check a verified CoT's answer against a program written from the "
        "problem alone (a disagreement unverifies the row).",
    )
    majority: bool = Field(
        False,
        description="Unverify a verified CoT whose answer is not the majority answer "
        "among the problem's CoTs (a tie decides nothing).",
    )


@dataclass
class _Calls:
    """Accumulates the usage of an attempt's verification calls."""

    usage: TokenUsage = field(default_factory=TokenUsage)
    error: ErrorInfo | None = None

    def add(self, result: ChatResult) -> bool:
        self.usage += result.usage
        if result.error is not None and self.error is None:
            self.error = result.error
        return result.ok


def _verdict(status: VerdictStatus, reason: str, expected: str | None = None) -> Verdict:
    return Verdict(status=status, expected=expected, reason=reason, rule="verify")


async def verify_attempt(
    rt: Runtime, cfg: VerifyConfig, problem: Problem, attempt: Attempt
) -> Attempt:
    """Verify one chain of thought by code; returns the attempt with every step filled."""
    if attempt.error is not None or attempt.text is None:
        err = attempt.error
        return attempt.model_copy(
            update={"verdict": _verdict("llm_error", err.message if err else "no text")}
        )
    if attempt.final_answer is None:
        return attempt.model_copy(
            update={"verdict": _verdict("no_answer", "the solution has no \\boxed{} answer")}
        )
    coder, critic = rt.client("coder"), rt.client("critic")
    calls = _Calls()
    steps: dict[str, str] = {}
    models: dict[str, str] = {}
    salt = attempt.id
    code_prompt = load_prompt("synth_code")
    values = {"problem": problem.statement, "solution": attempt.text}
    reply = await coder.chat(
        [{"role": "user", "content": code_prompt.render(**values)}],
        stage="verify.code",
        sampling=cfg.code_sampling,
        raise_on_error=False,
        cache_salt=f"code:{salt}",
    )
    steps[code_prompt.ref.template_id] = code_prompt.ref.sha256
    models["coder"] = reply.model or coder.endpoint.model
    update: dict[str, object] = {"step_prompts": steps, "step_models": models}
    if not calls.add(reply):
        return _finish(attempt, calls, update, _verdict("llm_error", _msg(calls.error)))
    draft = extract_code(reply.text)
    update["draft_code"] = draft
    if draft is None:
        verdict = _verdict("no_code", "the coder's reply has no ```python block")
        return _finish(attempt, calls, update, verdict, attempt.final_answer)
    code = draft
    critique_prompt = load_prompt("synth_critique")
    review = await critic.structured(
        [{"role": "user", "content": critique_prompt.render(**values, code=draft)}],
        CritiqueReply,
        stage="verify.critique",
        sampling=cfg.critic_sampling,
        raise_on_error=False,
        cache_salt=f"critique:{salt}",
    )
    steps[critique_prompt.ref.template_id] = critique_prompt.ref.sha256
    models["critic"] = review.result.model or critic.endpoint.model
    calls.add(review.result)
    if review.error is not None and review.error.transient:
        return _finish(attempt, calls, update, _verdict("llm_error", review.error.message))
    critique = _critique(review.value, review.error, models["critic"])
    update["critique"] = critique
    if cfg.regenerate and review.value is not None:
        regen_prompt = load_prompt("synth_regen_code")
        regen = await coder.chat(
            [
                {
                    "role": "user",
                    "content": regen_prompt.render(
                        **values, code=draft, critique=_critique_text(critique)
                    ),
                }
            ],
            stage="verify.regen",
            sampling=cfg.code_sampling,
            raise_on_error=False,
            cache_salt=f"regen:{salt}",
        )
        steps[regen_prompt.ref.template_id] = regen_prompt.ref.sha256
        if not calls.add(regen):
            return _finish(attempt, calls, update, _verdict("llm_error", _msg(calls.error)))
        code = extract_code(regen.text) or draft
    update["code"] = code
    try:
        check = await check_code(
            rt.require_sandbox(), code, attempt.final_answer, limits=cfg.limits
        )
    except SandboxError as e:
        calls.error = ErrorInfo(kind="sandbox", message=str(e), stage="verify.execute")
        return _finish(attempt, calls, update, _verdict("llm_error", f"sandbox failed: {e}"))
    rt.pool.meter.record_sandbox("verify.exec", check.execution.wall_ms / 1000.0)
    update["execution"] = check.execution
    verdict = check.verdict()
    if cfg.leak_check:
        leak = detect_leak(code, attempt.final_answer)
        update["leak_score"] = round(min(1.0, max(0.0, leak.score)), 4)
        if leak.leak and verdict.status == "verified":
            verdict = Verdict(
                status="leak",
                expected=verdict.expected,
                predicted=verdict.predicted,
                rule="leak_check",
                reason="the code hard-codes the answer: " + "; ".join(leak.reasons),
            )
    return _finish(attempt, calls, update, verdict)


def _msg(error: ErrorInfo | None) -> str:
    return error.message if error else "unknown error"


def _finish(
    attempt: Attempt,
    calls: _Calls,
    update: dict[str, object],
    verdict: Verdict,
    expected: str | None = None,
) -> Attempt:
    if verdict.expected is None and expected is not None:
        verdict = verdict.model_copy(update={"expected": expected})
    update = {**update, "verdict": verdict, "usage": attempt.usage + calls.usage}
    if calls.error is not None and verdict.status == "llm_error":
        update["error"] = calls.error
    return attempt.model_copy(update=update)


def _critique(value: CritiqueReply | None, error: ErrorInfo | None, model: str) -> Critique:
    if value is None:
        return Critique(summary="", model=model, error=error)
    scores = {
        name: max(0.0, min(10.0, float(score)))
        for name in ("alignment", "rigor", "complexity")
        if (score := getattr(value, name)) is not None
    }
    issues = [*value.issues, *(f"edge case: {e}" for e in value.edge_cases)]
    return Critique(
        summary=value.summary, issues=issues, scores=scores, passed=value.passed, model=model
    )


def _critique_text(critique: Critique) -> str:
    if critique.error is not None:
        return "(no review available)"
    parts = [critique.summary, *critique.issues]
    parts += [f"{k}: {v:g}/10" for k, v in critique.scores.items()]
    return "\n".join(p for p in parts if p) or "(no issues found)"


def _execution_text(execution: ExecutionResult | None) -> str:
    if execution is None:
        return "(the program did not run)"
    out = execution.stdout.strip()[-1500:] or "(no output)"
    err = execution.stderr.strip()[-1500:]
    return f"status: {execution.status}\nstdout:\n{out}" + (f"\nstderr:\n{err}" if err else "")


async def rewrite_attempt(
    rt: Runtime, cfg: VerifyConfig, problem: Problem, failed: Attempt
) -> Attempt:
    """A revised chain of thought for a failed attempt (the next round, not verified)."""
    client = rt.client("rewriter")
    prompt = load_prompt("synth_rewrite")
    verdict = failed.verdict
    failure = f"{verdict.status}: {verdict.reason}" if verdict else "unknown"
    if verdict and verdict.predicted is not None:
        failure += (
            f" (the program computed {verdict.predicted}; the solution says {verdict.expected})"
        )
    text = prompt.render(
        problem=problem.statement,
        solution=failed.text or "",
        failure=failure,
        critique=_critique_text(failed.critique) if failed.critique else "(none)",
        execution=_execution_text(failed.execution),
    )
    result = await client.chat(
        [{"role": "user", "content": text}],
        stage="rewrite",
        sampling=cfg.rewrite_sampling,
        raise_on_error=False,
        cache_salt=f"rewrite:{failed.id}",
    )
    answer = extract_answer(result.text, number_fallback=False) if result.ok else None
    return Attempt(
        problem_id=failed.problem_id,
        kind=failed.kind,
        model=result.model or client.endpoint.model,
        sampling=cfg.rewrite_sampling,
        prompt=prompt.ref,
        sample_index=failed.sample_index,
        round=failed.round + 1,
        parent_id=failed.id,
        text=result.text if result.ok else None,
        final_answer=answer.text if answer else None,
        usage=result.usage,
        latency_ms=result.latency_ms,
        error=result.error,
        metadata={"cot_type": failed.kind},
    )


async def verify_lineage(
    rt: Runtime, cfg: VerifyConfig, problem: Problem, cot: Attempt
) -> list[Attempt]:
    """Verify ``cot``; while it fails and rounds remain, rewrite and verify again.
    Returns every round, first to last.
    """
    rounds = [await verify_attempt(rt, cfg, problem, cot)]
    while (
        rounds[-1].verdict is not None
        and rounds[-1].verdict.status in FAILURES_TO_REWRITE
        and rounds[-1].round < cfg.rounds
    ):
        revised = await rewrite_attempt(rt, cfg, problem, rounds[-1])
        rounds.append(await verify_attempt(rt, cfg, problem, revised))
    return rounds


def solution_row(problem: Problem, rounds: list[Attempt]) -> SolutionRow:
    """The flat dataset row of a lineage: its last round, with the whole lineage."""
    last = rounds[-1]
    verdict = last.verdict or Verdict(status="failed", reason="not verified")
    prompts: dict[str, str] = {}
    for a in rounds:
        if a.prompt is not None:
            prompts[a.prompt.template_id] = a.prompt.sha256
        prompts.update(a.step_prompts)
    return SolutionRow(
        id=last.id,
        problem_id=problem.id,
        problem=problem.statement,
        topic=problem.topic,
        domain=problem.domain,
        cot_type=last.kind,
        solution=last.text or "",
        final_answer=last.final_answer,
        code=last.code,
        computed_answer=verdict.predicted,
        status=verdict.status,
        reason=verdict.reason,
        rounds=last.round,
        lineage=[a.id for a in rounds],
        model=last.model,
        prompts=prompts,
        prompt_tokens=sum(a.usage.prompt_tokens for a in rounds),
        completion_tokens=sum(a.usage.completion_tokens for a in rounds),
    )
