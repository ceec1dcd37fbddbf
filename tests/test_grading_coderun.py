"""The code-run check against the real local sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mathmill.grading.coderun import check_code
from mathmill.sandbox import Limits, LocalSandbox

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[LocalSandbox]:
    async with LocalSandbox(workers=2, limits=Limits(timeout_s=3)) as sb:
        yield sb


@pytest.mark.parametrize(
    ("code", "expected", "status", "computed", "source"),
    [
        ("eggs = 16 - 3 - 4\nprint(eggs * 2)", "18", "verified", "18", "printed"),
        ("print('working...')\nprint(18.0)", "18", "verified", "18.0", "printed"),
        (
            "from fractions import Fraction\nprint(Fraction(3, 4))",
            r"\frac{3}{4}",
            "verified",
            "3/4",
            "printed",
        ),
        ("print(r'\\boxed{\\frac{1}{2}}')", "0.5", "verified", r"\frac{1}{2}", "printed"),
        ("answer = sum(range(1, 5))", "10", "verified", "10", "assigned"),
        ("print(17)", "18", "wrong_answer", "17", "printed"),
        ("x = 1", "1", "no_output", None, "none"),
        ("raise ValueError('bad input')", "1", "error", None, "none"),
        ("while True: pass", "1", "timeout", None, "none"),
        (
            "import sympy\nx = sympy.Symbol('x')\nprint(sympy.expand((x+1)**2))",
            "x^2+2x+1",
            "verified",
            "x**2 + 2*x + 1",
            "printed",
        ),
    ],
    ids=[
        "printed",
        "float",
        "fraction",
        "boxed",
        "assigned",
        "wrong",
        "no-output",
        "error",
        "timeout",
        "sympy",
    ],
)
async def test_check_code(
    sandbox: LocalSandbox,
    code: str,
    expected: str,
    status: str,
    computed: str | None,
    source: str,
) -> None:
    result = await check_code(sandbox, code, expected)
    assert (result.status, result.computed, result.source) == (status, computed, source), result
    assert result.execution.backend == "local"  # the evidence is kept
    assert result.reason
    verdict = result.verdict()
    assert verdict.status == status and verdict.expected == expected
