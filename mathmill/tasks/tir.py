"""Tool-integrated reasoning: multi-turn trajectories against a stateful sandbox session.

One session per trajectory. The model writes ``<python>`` blocks; each runs in the
session and comes back as a tool turn with ``<repl>`` (the output, truncated) and
``<state>`` (the session's one-line state). A ``<final_answer>`` before any code has
run gets a nudge; a reply with no valid tag gets a reminder; ``max_turns`` model
replies without a final answer fail the trajectory. ``<repl>``/``<state>`` blocks the
model writes itself are hallucinated tool output: stripped and counted. The answer
is the ``\\boxed{}`` of the final answer, graded against the expected answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from mathmill.grading.extract import last_boxed
from mathmill.grading.reference import check_answer
from mathmill.pipeline.chunks import Runtime, map_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.prompts import load_prompt
from mathmill.records import (
    Attempt,
    ErrorInfo,
    ExecutionResult,
    Problem,
    PromptRef,
    SamplingParams,
    TokenUsage,
    Turn,
    Verdict,
)
from mathmill.sandbox.protocol import SandboxError, SessionResult

__all__ = [
    "NUDGE",
    "REMINDER",
    "TirConfig",
    "TirRows",
    "TurnEvent",
    "clean_reply",
    "run_trajectory",
    "tir_chunk",
    "tool_turn",
    "trajectories",
]

NUDGE = "Execute Python code before answering: write it in <python></python> tags."
REMINDER = (
    "Continue: write Python code in <python></python> tags, or give your answer as "
    "<final_answer>\\boxed{...}</final_answer>."
)
_PYTHON = re.compile(r"<python>(.*?)</python>", re.DOTALL)
_FINAL = re.compile(r"<final_answer>(.*?)</final_answer>", re.DOTALL)
_FAKE_TOOL = re.compile(r"<(repl|state)>.*?(?:</\1>|\Z)", re.DOTALL)


class TirConfig(BaseModel):
    """How a trajectory runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_turns: int = Field(8, ge=1, le=100, description="Model replies per trajectory.")
    max_nudges: int = Field(2, ge=0, le=10, description="'Run code first' nudges at most.")
    max_output_chars: int = Field(2000, ge=100, le=100_000, description="<repl> output cap.")
    turn_timeout_s: float = Field(10.0, gt=0, le=600, description="Per code block.")
    samples: int = Field(1, ge=1, le=64, description="Trajectories per problem.")
    sampling: SamplingParams


@dataclass(frozen=True)
class TurnEvent:
    """One step of a trajectory, for ``--debug`` printing."""

    problem_id: str
    sample: int
    role: str
    content: str
    note: str = ""


TurnHook = Callable[[TurnEvent], None]


def clean_reply(text: str, finish_reason: str | None) -> tuple[str, int]:
    """The reply as the model should have written it, and how many hallucinated tool
    blocks were removed. Generation stops at ``</python>`` (a stop sequence the server
    drops from the text, so it is restored); anything after the first code block is
    cut, as the stop sequence would have.

    >>> clean_reply("x <python>print(1)", "stop")
    ('x <python>print(1)</python>', 0)
    >>> clean_reply("<python>1</python><repl>1</repl> so 1", "stop")
    ('<python>1</python>', 1)
    """
    cleaned, fakes = _FAKE_TOOL.subn("", text)
    open_at = cleaned.find("<python>")
    if open_at != -1:
        close_at = cleaned.find("</python>", open_at)
        if close_at == -1:
            if finish_reason == "stop":  # stopped at </python>
                cleaned += "</python>"
        else:
            cleaned = cleaned[: close_at + len("</python>")]
    return cleaned.strip(), fakes


def tool_turn(result: ExecutionResult, state: str, max_chars: int, timeout_s: float) -> str:
    """The tool turn for one code run: ``<repl>`` with its output, ``<state>``."""
    output = result.stdout
    if result.stderr.strip():
        output += ("\n" if output and not output.endswith("\n") else "") + result.stderr
    output = output.strip("\n")
    if len(output) > max_chars:
        output = output[:max_chars] + f"\n[... {len(output) - max_chars} more characters]"
    if result.status == "timeout":
        output += f"\n[timeout: the code ran past {timeout_s:g}s; the session is as before]"
    elif result.status in ("memory", "crashed", "output_limit"):
        output += f"\n[{result.status}: the session is as before this code]"
    return f"<repl>\n{output.strip() or '(no output)'}\n</repl>\n<state>\n{state}\n</state>"


@dataclass
class _Trajectory:
    turns: list[Turn] = field(default_factory=list)
    usage: TokenUsage = field(default_factory=TokenUsage)
    counts: Counter[str] = field(default_factory=Counter)
    final: str | None = None
    error: ErrorInfo | None = None
    model: str = ""


async def run_trajectory(
    rt: Runtime,
    cfg: TirConfig,
    problem: Problem,
    sample: int,
    sessions: asyncio.Semaphore,
    on_turn: TurnHook | None = None,
) -> Attempt:
    """One trajectory for ``problem`` in its own session (always deleted)."""
    client = rt.client("solver")
    system, user = load_prompt("tir_system"), load_prompt("tir_user")
    sandbox = rt.require_sandbox()
    sampling = cfg.sampling.model_copy(
        update={
            "seed": None if cfg.sampling.seed is None else cfg.sampling.seed + sample,
            "stop": ["</python>"],
        }
    )
    t = _Trajectory(model=client.endpoint.model)
    t.turns = [
        Turn(role="system", content=system.render(max_output=cfg.max_output_chars).strip()),
        Turn(role="user", content=user.render(problem=problem.statement).strip()),
    ]

    def emit(role: str, content: str, note: str = "") -> None:
        if on_turn is not None:
            on_turn(TurnEvent(problem.id, sample, role, content, note))

    emit("user", t.turns[1].content)
    async with sessions:
        try:
            session = await sandbox.create_session()
        except SandboxError as e:
            t.error = ErrorInfo(kind="sandbox", message=str(e), stage="tir.session")
            return _attempt(problem, sample, sampling, t, system.ref, "failed", str(e))
        try:
            await _loop(rt, cfg, problem, sample, sampling, t, session, emit)
        except SandboxError as e:
            t.error = ErrorInfo(kind="sandbox", message=str(e), stage="tir.execute")
        finally:
            with contextlib.suppress(SandboxError):
                await sandbox.delete_session(session)
    if t.error is not None:
        return _attempt(problem, sample, sampling, t, system.ref, "failed", t.error.message)
    if t.final is None:
        reason = f"no final answer after {cfg.max_turns} model turns"
        return _attempt(problem, sample, sampling, t, system.ref, "failed", reason)
    return _attempt(problem, sample, sampling, t, system.ref, None, "")


async def _loop(
    rt: Runtime,
    cfg: TirConfig,
    problem: Problem,
    sample: int,
    sampling: SamplingParams,
    t: _Trajectory,
    session: str,
    emit: Callable[[str, str, str], None],
) -> None:
    client = rt.client("solver")
    sandbox = rt.require_sandbox()
    for turn in range(cfg.max_turns):
        messages = [{"role": _chat_role(x.role), "content": x.content} for x in t.turns]
        result = await client.chat(
            messages,
            stage="tir.generate",
            sampling=sampling,
            raise_on_error=False,
            cache_salt=f"tir:{problem.id}:{sample}:{turn}",
        )
        t.usage += result.usage
        if not result.ok:
            t.error = result.error
            return
        t.model = result.model or t.model
        finish = result.choices[0].finish_reason if result.choices else None
        reply, fakes = clean_reply(result.text, finish)
        t.counts["hallucinated_tags"] += fakes
        t.turns.append(Turn(role="assistant", content=reply))
        t.counts["model_turns"] += 1
        emit("assistant", reply, f"{fakes} hallucinated tool blocks removed" if fakes else "")
        code = _PYTHON.search(reply)
        final = _FINAL.search(reply)
        if code is not None:
            run = await sandbox.run_in_session(session, code.group(1), cfg.turn_timeout_s)
            rt.pool.meter.record_sandbox("tir.exec", run.wall_ms / 1000.0)
            t.counts["code_blocks"] += 1
            t.counts["code_errors"] += run.status != "ok"
            content = tool_turn(run, _state(run), cfg.max_output_chars, cfg.turn_timeout_s)
            t.turns.append(Turn(role="tool", content=content, execution=_plain(run)))
            emit("tool", content, run.status)
        elif (
            final is not None
            and t.counts["code_blocks"] == 0
            and t.counts["nudges"] < cfg.max_nudges
        ):
            t.counts["nudges"] += 1
            t.turns.append(Turn(role="user", content=NUDGE))
            emit("user", NUDGE, "nudge")
        elif final is not None:
            text = final.group(1).strip()
            t.final = last_boxed(text) or text
            emit("final", t.final, "")
            return
        else:
            t.counts["no_tag_turns"] += 1
            t.turns.append(Turn(role="user", content=REMINDER))
            emit("user", REMINDER, "no valid tag")


def _chat_role(role: str) -> str:
    # Tool output goes back as a user message: plain chat templates have no tool role
    # without a tool call id. The stored turn keeps role "tool".
    return "user" if role == "tool" else role


def _state(run: SessionResult) -> str:
    return run.state.summary if run.state is not None else "(unknown)"


def _plain(run: SessionResult) -> ExecutionResult:
    return ExecutionResult.model_validate(run.model_dump(include=set(ExecutionResult.model_fields)))


def _attempt(
    problem: Problem,
    sample: int,
    sampling: SamplingParams,
    t: _Trajectory,
    prompt: PromptRef,
    status: str | None,
    reason: str,
) -> Attempt:
    if status is None:  # a final answer: grade it
        verdict = check_answer(problem.answer, t.final, problem=problem.statement)
    else:
        verdict = Verdict(status="failed", expected=problem.answer, reason=reason)
    metadata: dict[str, JsonValue] = {
        "success": status is None,
        "num_turns": t.counts["model_turns"],
        "num_code_blocks": t.counts["code_blocks"],
        "num_code_errors": t.counts["code_errors"],
        "num_nudges": t.counts["nudges"],
        "num_no_tag_turns": t.counts["no_tag_turns"],
        "hallucinated_tags": t.counts["hallucinated_tags"],
    }
    return Attempt(
        problem_id=problem.id,
        kind="tir",
        model=t.model,
        sampling=sampling,
        prompt=prompt,
        sample_index=sample,
        final_answer=t.final,
        verdict=verdict,
        turns=t.turns,
        usage=t.usage,
        error=t.error,
        metadata=metadata,
    )


@dataclass
class TirRows:
    """A chunk's trajectories, counts and transient errors."""

    attempts: list[Attempt]
    counts: Counter[str]
    errors: list[ErrorInfo]


async def tir_chunk(
    rt: Runtime,
    cfg: TirConfig,
    problems: list[Problem],
    sessions: asyncio.Semaphore,
    on_turn: TurnHook | None = None,
) -> TirRows:
    """Every trajectory of a chunk of problems (``cfg.samples`` each)."""
    jobs = [(p, s) for p in problems for s in range(cfg.samples)]

    async def one(job: tuple[Problem, int]) -> Attempt:
        return await run_trajectory(rt, cfg, job[0], job[1], sessions, on_turn)

    attempts = await map_rows(jobs, one, rt.row_concurrency)
    counts: Counter[str] = Counter()
    errors = []
    for a in attempts:
        assert a.verdict is not None
        counts["tir.processed"] += 1
        counts[f"tir.{a.verdict.status}"] += 1
        counts["tir.model_turns"] += int(a.metadata["num_turns"])  # type: ignore[arg-type]
        counts["tir.code_blocks"] += int(a.metadata["num_code_blocks"])  # type: ignore[arg-type]
        counts["tir.nudges"] += int(a.metadata["num_nudges"])  # type: ignore[arg-type]
        counts["tir.hallucinated_tags"] += int(a.metadata["hallucinated_tags"])  # type: ignore[arg-type]
        if a.error is not None:
            errors.append(a.error)
    return TirRows(attempts, counts, errors)


@stage(
    "trajectories",
    params=TirConfig,
    roles=("solver",),
    prompts=("tir_system", "tir_user"),
    inputs={"problems": Problem},
    outputs={"trajectories": Attempt},
)
async def trajectories(chunk: Chunk, cfg: TirConfig) -> StageResult:
    """The trajectories of one chunk of problems (``cfg.samples`` each)."""
    rt = chunk.rt
    got = await tir_chunk(
        rt, cfg, chunk.rows("problems"), rt.extra["sessions"], rt.extra.get("on_turn")
    )
    return StageResult(
        rows={"trajectories": got.attempts},
        counts=got.counts,
        errors=got.errors,
        attempted=len(got.attempts),
    )
