"""``mathmill demo``: a small real round trip through the embedded (or a configured) model.

Reads the bundled GSM8K sample, asks the model for a step-by-step solution, asks it
again for the final answer as structured output, and writes problems and attempts
as Parquet chunks of a run directory, then reads them back.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field

from mathmill.grading import grade
from mathmill.llm.client import LLMClient, LLMPool
from mathmill.llm.config import EndpointConfig
from mathmill.llm.usage import UsageMeter
from mathmill.prompts import load_prompt
from mathmill.records import Attempt, ErrorInfo, Problem, SamplingParams, Verdict
from mathmill.sources import read_problems_jsonl
from mathmill.storage import ChunkRef, RunStore

__all__ = ["DemoReport", "run_demo_async"]

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


class FinalAnswer(BaseModel):
    """The structured reply of the answer-extraction call."""

    answer: str = Field(description="Only the final answer.")


@dataclass
class DemoReport:
    """What the demo wrote and measured."""

    run_dir: str
    problems: ChunkRef
    attempts: ChunkRef
    rows: list[Attempt]
    meter: UsageMeter
    seconds: float
    skipped: list[ErrorInfo]


async def _solve(client: LLMClient, problem: Problem, max_tokens: int) -> Attempt:
    solve = load_prompt("demo_solve")
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    cot = await client.chat(
        [{"role": "user", "content": solve.render(statement=problem.statement)}],
        stage="demo.solve",
        sampling=sampling,
        raise_on_error=False,
    )
    attempt = Attempt(
        problem_id=problem.id,
        kind="long_cot",
        model=client.endpoint.model,
        sampling=sampling,
        prompt=solve.ref,
        text=cot.text,
        usage=cot.usage,
        latency_ms=cot.latency_ms,
        error=cot.error,
    )
    if not cot.ok:
        return attempt
    boxed = _BOXED.findall(cot.text)
    answer = boxed[-1] if boxed else None
    rule = "boxed"
    if answer is None:
        extract = load_prompt("demo_answer")
        parsed = await client.structured(
            [
                {
                    "role": "user",
                    "content": extract.render(statement=problem.statement, solution=cot.text),
                }
            ],
            FinalAnswer,
            stage="demo.extract",
            sampling=SamplingParams(temperature=0.0, max_tokens=64),
            raise_on_error=False,
        )
        answer = parsed.value.answer if parsed.value else None
        rule = "structured" if parsed.ok else "none"
        attempt.metadata = {"extract_raw": parsed.raw[:500], "extract_repaired": parsed.repaired}
        if parsed.error:
            attempt.error = parsed.error
    attempt.final_answer = answer
    graded = grade(problem.answer, answer)
    attempt.verdict = Verdict(
        status="correct" if graded.equivalent else "incorrect",
        expected=problem.answer,
        predicted=answer,
        rule=f"{graded.rule} (answer found by {rule})",
        reason=graded.reason,
    )
    return attempt


async def run_demo_async(
    endpoint: EndpointConfig,
    out: str,
    *,
    limit: int = 5,
    max_tokens: int = 200,
    on_solved: Callable[[Attempt], None] | None = None,
) -> DemoReport:
    """Run the demo against ``endpoint`` and write its run directory under ``out``.

    ``on_solved`` is called as each problem's attempt finishes (for progress bars).
    """
    start = time.perf_counter()
    source = resources.files("mathmill").joinpath("data/gsm8k_sample.jsonl")
    problems: list[Problem] = []
    skipped: list[ErrorInfo] = []
    with resources.as_file(source) as path:
        for item in read_problems_jsonl(path):
            (problems if isinstance(item, Problem) else skipped).append(item)  # type: ignore[arg-type]
    problems = problems[:limit]
    run_dir = str(Path(out) / time.strftime("demo-%Y%m%d-%H%M%S"))
    store = RunStore(run_dir)
    problem_ref = store.dataset("problems").write_chunk("00000", problems)
    async with LLMPool() as pool:
        client = pool.client(endpoint)

        async def solve(problem: Problem) -> Attempt:
            attempt = await _solve(client, problem, max_tokens)
            if on_solved is not None:
                on_solved(attempt)
            return attempt

        attempts = await asyncio.gather(*(solve(p) for p in problems))
        meter = pool.meter
    attempt_ref = store.dataset("attempts").write_chunk("00000", list(attempts))
    store.write_bytes("usage.md", meter.to_markdown().encode())
    rows = store.dataset("attempts").read_chunk(attempt_ref, Attempt)
    return DemoReport(
        run_dir=store.url,
        problems=problem_ref,
        attempts=attempt_ref,
        rows=rows,
        meter=meter,
        seconds=time.perf_counter() - start,
        skipped=skipped,
    )
