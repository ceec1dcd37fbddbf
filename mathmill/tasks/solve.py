"""Solving a problem by code with iterative repair (the AIMO pipeline's stage 0).

The solver writes a Python program from the problem alone (no answer in the prompt);
the sandbox runs it; the printed answer is graded against the reference. On a
timeout, an error, no output or a wrong answer, the failure goes back to the model
("your program printed 12, which is not the right answer; the answer is expected as
a fraction", the traceback's last lines, the time limit) and it tries again, up to
``rounds`` times. Every attempt is kept, linked by ``parent_id``. ``samples`` > 1
makes independent lineages (pass@k).

Without a reference answer the program is still run and its printed value kept
(``unvalidated``): synthesize's blind check compares it with a chain of thought's
answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from mathmill.grading.coderun import check_code
from mathmill.grading.leaks import detect_leak
from mathmill.grading.normalize import normalize, parse_number
from mathmill.pipeline.chunks import Runtime
from mathmill.prompts import load_prompt
from mathmill.records import (
    Attempt,
    CuratedRow,
    ErrorInfo,
    Problem,
    PromptRef,
    SamplingParams,
    Verdict,
    VerdictStatus,
)
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import SandboxError
from mathmill.tasks.verify import extract_code

__all__ = [
    "REPAIRABLE",
    "SolveConfig",
    "answer_form",
    "ask_for_code",
    "curated_row",
    "failure_feedback",
    "grade_attempt",
    "last_status",
    "solve_lineage",
    "solve_problem",
    "solved_by",
]

REPAIRABLE: frozenset[str] = frozenset({"wrong_answer", "error", "timeout", "no_output", "no_code"})
"""Verdicts that get a repair round (an LLM error does not: it is the endpoint's)."""


class SolveConfig(BaseModel):
    """How problems are solved by code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(2, ge=0, le=10, description="Repair rounds after a failed program.")
    samples: int = Field(1, ge=1, le=64, description="Independent programs per problem (k).")
    limits: Limits = Field(default_factory=lambda: Limits(timeout_s=10.0))
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.2, max_tokens=1024)
    )
    leak_check: bool = Field(True, description="Score each program with the AST detector.")


def answer_form(answer: str) -> str:
    """What kind of value an answer is, in words (never the value itself).

    >>> answer_form("12"), answer_form("\\\\frac{3}{4}"), answer_form("(1, 2)")
    ('an integer', 'a fraction', 'a tuple')
    """
    text, _ = normalize(answer)
    number = parse_number(text)
    if number is not None:
        if number.denominator == 1:
            return "an integer"
        return "a fraction" if "/" in text or "frac" in answer else "a decimal number"
    if text.startswith(("(", "[")) and "," in text:
        return "a tuple"
    if any(c in text for c in "\\^√πsqrtpi") or any(c.isalpha() for c in text):
        return "an expression"
    return "text"


def failure_feedback(verdict: Verdict, stderr: str, limits: Limits, reference: str | None) -> str:
    """What the solver is told about a failed program: never the expected answer, only
    its form (``reference`` is the answer as the source wrote it: ``12.50`` is a decimal
    even when the normalized reference is ``25/2``).
    """
    status = verdict.status
    if status == "timeout":
        return (
            f"the program did not finish within {limits.timeout_s:g} s. Make it faster: "
            "avoid brute force over large ranges, use closed forms or smarter search."
        )
    if status == "error":
        tail = "\n".join(stderr.strip().splitlines()[-6:])[-1200:] or verdict.reason
        return f"the program stopped with an error:\n{tail}"
    if status == "no_output":
        return "the program printed nothing. Print the final answer on the last line."
    if status == "no_code":
        return "your reply had no ```python code block."
    computed = verdict.predicted or "?"
    text = f"the program printed {computed}, which is not the right answer."
    if reference is not None:
        want, got = answer_form(reference), answer_form(computed)
        if want != got:
            text += f" The answer is expected as {want}; your answer {computed} is {got}."
    return text + " Find the mistake in the reasoning the code follows."


async def _run(
    rt: Runtime, cfg: SolveConfig, code: str, reference: str | None, stage: str
) -> tuple[Verdict, str, object]:
    """Run ``code`` and grade it: (verdict, stderr, execution)."""
    check = await check_code(rt.require_sandbox(), code, reference or "", limits=cfg.limits)
    rt.pool.meter.record_sandbox(f"{stage}.exec", check.execution.wall_ms / 1000.0)
    verdict = check.verdict()
    if reference is None and verdict.status in ("verified", "wrong_answer"):
        verdict = Verdict(
            status="unvalidated",
            predicted=check.computed,
            rule="solve",
            reason="no reference answer: the printed value is kept",
        )
    return verdict, check.execution.stderr, check.execution


async def ask_for_code(
    rt: Runtime,
    role: str,
    prompt: PromptRef,
    text: str,
    *,
    problem_id: str,
    sampling: SamplingParams,
    stage: str,
    salt: str,
    sample_index: int,
    round_: int,
    parent_id: str | None,
    metadata: dict[str, JsonValue],
) -> Attempt:
    """One chat call asking ``role`` for a program, as an ungraded :class:`Attempt`
    (the reply's text, usage and error; ``round_`` and ``parent_id`` place it in its
    lineage). Solve rounds, repairs and leak repairs all ask this way.
    """
    client = rt.client(role)
    reply = await client.chat(
        [{"role": "user", "content": text}],
        stage=stage,
        sampling=sampling,
        raise_on_error=False,
        cache_salt=salt,
    )
    return Attempt(
        problem_id=problem_id,
        kind="code",
        model=reply.model or client.endpoint.model,
        sampling=sampling,
        prompt=prompt,
        sample_index=sample_index,
        round=round_,
        parent_id=parent_id,
        text=reply.text if reply.ok else None,
        usage=reply.usage,
        latency_ms=reply.latency_ms,
        error=reply.error,
        metadata=metadata,
    )


async def solve_lineage(
    rt: Runtime,
    cfg: SolveConfig,
    problem: Problem,
    *,
    sample_index: int = 0,
    role: str = "solver",
    stage: str = "solve",
) -> list[Attempt]:
    """One program for ``problem`` and its repair rounds, first to last: until one is
    right (or, without a reference, runs and prints), or ``cfg.rounds`` repairs are
    spent. A transient LLM or sandbox failure ends the lineage with an ``llm_error``
    attempt carrying the error (the chunk is then retried).
    """
    solve_prompt, repair_prompt = load_prompt("curate_solve"), load_prompt("curate_repair")
    reference = problem.answer
    sampling = cfg.sampling
    if cfg.samples > 1 and sampling.seed is not None:
        sampling = sampling.model_copy(update={"seed": sampling.seed + sample_index})
    lineage: list[Attempt] = []
    while True:
        previous = lineage[-1] if lineage else None
        if previous is None:
            prompt = solve_prompt
            text = prompt.render(problem=problem.statement)
        else:
            prompt = repair_prompt
            feedback = str(previous.metadata.get("feedback", ""))
            text = prompt.render(
                problem=problem.statement, code=previous.code or "(none)", feedback=feedback
            )
        attempt = await ask_for_code(
            rt,
            role,
            prompt.ref,
            text,
            problem_id=problem.id,
            sampling=sampling,
            stage=f"{stage}.code" if previous is None else f"{stage}.repair",
            salt=f"{stage}:{problem.id}:{sample_index}:{len(lineage)}",
            sample_index=sample_index,
            round_=len(lineage),
            parent_id=previous.id if previous else None,
            metadata={"step": stage, "role": role},
        )
        form = problem.metadata.get("original_answer")
        attempt = await grade_attempt(
            rt, cfg, attempt, reference, stage, form=str(form) if form else None
        )
        lineage.append(attempt)
        verdict = attempt.verdict
        assert verdict is not None
        if verdict.status not in REPAIRABLE or attempt.round >= cfg.rounds:
            return lineage


async def grade_attempt(
    rt: Runtime,
    cfg: SolveConfig,
    attempt: Attempt,
    reference: str | None,
    stage: str,
    *,
    form: str | None = None,
) -> Attempt:
    """The attempt graded: its code run against ``reference``; the execution, verdict,
    leak score and, for a failure worth repairing, the feedback for the next round
    (``form``: the reference as the source wrote it, for the "expected form" hint).
    """
    if attempt.error is not None or attempt.text is None:
        message = attempt.error.message if attempt.error else "no reply"
        verdict = Verdict(status="llm_error", reason=message, rule="solve")
        return attempt.model_copy(update={"verdict": verdict})
    code = extract_code(attempt.text)
    if code is None:
        verdict = Verdict(status="no_code", reason="the reply has no ```python block", rule="solve")
        feedback = failure_feedback(verdict, "", cfg.limits, form or reference)
        return attempt.model_copy(
            update={"verdict": verdict, "metadata": {**attempt.metadata, "feedback": feedback}}
        )
    try:
        verdict, stderr, execution = await _run(rt, cfg, code, reference, stage)
    except SandboxError as e:
        error = ErrorInfo(kind="sandbox", message=str(e), stage=f"{stage}.execute")
        verdict = Verdict(status="llm_error", reason=f"sandbox failed: {e}", rule="solve")
        return attempt.model_copy(update={"code": code, "verdict": verdict, "error": error})
    update: dict[str, object] = {"code": code, "verdict": verdict, "execution": execution}
    update["final_answer"] = verdict.predicted
    if cfg.leak_check and reference is not None:
        update["leak_score"] = round(min(1.0, max(0.0, detect_leak(code, reference).score)), 4)
    if verdict.status in REPAIRABLE:
        feedback = failure_feedback(verdict, stderr, cfg.limits, form or reference)
        update["metadata"] = {**attempt.metadata, "feedback": feedback}
    return attempt.model_copy(update=update)


async def solve_problem(
    rt: Runtime, cfg: SolveConfig, problem: Problem, *, role: str = "solver", stage: str = "solve"
) -> list[list[Attempt]]:
    """``cfg.samples`` independent lineages for ``problem`` (run one after another, so
    a chunk's concurrency stays per problem).
    """
    return [
        await solve_lineage(rt, cfg, problem, sample_index=i, role=role, stage=stage)
        for i in range(cfg.samples)
    ]


def solved_by(lineages: Sequence[list[Attempt]]) -> list[Attempt] | None:
    """The first lineage whose last attempt is right (fewest repair rounds first)."""
    good = [
        lin
        for lin in lineages
        if lin and lin[-1].verdict is not None and lin[-1].verdict.status == "verified"
    ]
    return min(good, key=lambda lin: (len(lin), lin[0].sample_index)) if good else None


def last_status(lineages: Sequence[list[Attempt]]) -> tuple[VerdictStatus, str]:
    """The failure of an unsolved problem: the first lineage's last verdict."""
    for lin in lineages:
        if lin and lin[-1].verdict is not None:
            return lin[-1].verdict.status, lin[-1].verdict.reason
    return "failed", "no attempt"


def curated_row(problem: Problem, lineage: list[Attempt], solved: int, samples: int) -> CuratedRow:
    """The dataset row of a solved problem: the winning lineage's last program."""
    last = lineage[-1]
    meta = problem.metadata
    original_answer = meta.get("original_answer")
    return CuratedRow(
        id=problem.id,
        problem=problem.statement,
        original_problem=str(meta.get("original_statement") or problem.statement),
        answer=problem.answer or "",
        original_answer=str(original_answer if original_answer is not None else problem.answer),
        source=problem.source,
        source_id=problem.source_id,
        license=problem.license,
        domain=problem.domain,
        cluster_id=str(meta["cluster_id"]) if meta.get("cluster_id") is not None else None,
        code=last.code or "",
        computed_answer=last.verdict.predicted if last.verdict else None,
        rounds=last.round,
        sample_index=last.sample_index,
        samples_solved=solved,
        samples=samples,
        lineage=[a.id for a in lineage],
        model=last.model,
        prompt_tokens=sum(a.usage.prompt_tokens for a in lineage),
        completion_tokens=sum(a.usage.completion_tokens for a in lineage),
        metadata={
            k: v
            for k, v in meta.items()
            if k not in ("original_statement", "original_answer", "cluster_id")
        },
    )
