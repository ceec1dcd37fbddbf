"""The code-run check: run solution code in the sandbox and grade what it computed.

The computed answer is the last line the code printed (a ``\\boxed{}`` in it is
unwrapped), or, when it printed nothing, the value it assigned to ``answer``,
``result``, ``ans``, ``final_answer`` or ``solution``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from mathmill.grading.extract import last_boxed
from mathmill.grading.reference import check_answer
from mathmill.records import ExecutionResult, Verdict
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.protocol import Sandbox

__all__ = ["ANSWER_NAMES", "CodeCheck", "CodeCheckStatus", "check_code"]

CodeCheckStatus = Literal["verified", "wrong_answer", "error", "timeout", "no_output"]
ANSWER_NAMES = ("answer", "result", "ans", "final_answer", "solution")
_MARKER = "__MATHMILL_ASSIGNED__"
_EPILOGUE = f"""
for __mm_name in {ANSWER_NAMES!r}:
    if __mm_name in globals() and not callable(globals()[__mm_name]):
        print({_MARKER!r} + str(globals()[__mm_name]))
        break
"""


class CodeCheck(BaseModel):
    """The outcome of a code-run check, with its evidence."""

    model_config = ConfigDict(extra="forbid")

    status: CodeCheckStatus
    expected: str
    computed: str | None
    source: Literal["printed", "assigned", "none"]
    rule: str
    reason: str
    execution: ExecutionResult

    def verdict(self) -> Verdict:
        """As a :class:`~mathmill.records.Verdict` for an attempt's ``verdict`` field."""
        return Verdict(
            status=self.status,
            expected=self.expected,
            predicted=self.computed,
            rule=self.rule,
            reason=self.reason,
        )


def _computed(stdout: str) -> tuple[str | None, Literal["printed", "assigned", "none"]]:
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    assigned = [line[len(_MARKER) :] for line in lines if line.startswith(_MARKER)]
    printed = [line for line in lines if not line.startswith(_MARKER)]
    if printed:
        last = printed[-1]
        return (last_boxed(last) or last), "printed"
    if assigned and assigned[-1].strip():
        return assigned[-1].strip(), "assigned"
    return None, "none"


async def check_code(
    sandbox: Sandbox, code: str, expected: str, *, limits: Limits | None = None
) -> CodeCheck:
    """Run ``code`` in ``sandbox`` and compare its result with ``expected``."""
    execution = await sandbox.execute(code + "\n" + _EPILOGUE, limits)

    def failed(status: CodeCheckStatus, reason: str) -> CodeCheck:
        return CodeCheck(
            status=status,
            expected=expected,
            computed=None,
            source="none",
            rule="sandbox",
            reason=reason,
            execution=execution,
        )

    if execution.status == "timeout":
        return failed("timeout", "the code ran past its time limit")
    if execution.status != "ok":
        last = execution.stderr.strip().splitlines()[-1:] or [execution.status]
        return failed("error", f"{execution.status}: {last[0][:200]}")
    computed, source = _computed(execution.stdout)
    if computed is None:
        return failed("no_output", "the code printed nothing and assigned no answer")
    verdict = check_answer(expected, computed)
    return CodeCheck(
        status="verified" if verdict.status == "correct" else "wrong_answer",
        expected=expected,
        computed=computed,
        source=source,
        rule=verdict.rule,
        reason=verdict.reason,
        execution=execution,
    )
