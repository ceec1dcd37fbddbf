"""The evaluation metrics (tasks/evaluate.py) on hand-made samples."""

from __future__ import annotations

from mathmill.records import Problem, Sample
from mathmill.tasks.evaluate import evaluate_samples, failure_kind, metric_rows, wilson


def sample(pid: str, status: str, answer: str | None, ref: str = "25/2", **kw: object) -> Sample:
    return Sample(
        id=f"{pid}-{status}-{answer}",
        problem_id=pid,
        problem="p",
        reference=ref,
        index=0,
        text=f"so {answer}",
        final_answer=answer,
        status=status,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def test_failure_kinds() -> None:
    assert failure_kind(sample("a", "correct", "25/2")) is None
    assert failure_kind(sample("a", "unvalidated", "3", ref="")) is None
    assert failure_kind(sample("a", "error", None)) == "error"
    assert failure_kind(sample("a", "incorrect", "3", finish_reason="length")) == "truncated"
    assert failure_kind(sample("a", "no_answer", None)) == "no_answer"
    # against the answer as the source wrote it (12.50): a decimal is the right form
    assert failure_kind(sample("a", "incorrect", "12.4"), written="12.50") == "wrong_value"
    assert failure_kind(sample("a", "incorrect", "x + 1"), written="12.50") == "format"


def test_errors_count_as_wrong_and_groups_add_up() -> None:
    problems = [
        Problem(
            id="a", statement="a", answer="1", metadata={"bucket": "small", "domain": "algebra"}
        ),
        Problem(
            id="b", statement="b", answer="2", metadata={"bucket": "large", "domain": "algebra"}
        ),
    ]
    rows = [
        sample("a", "correct", "1", ref="1"),
        sample("b", "error", None, ref="2"),
        sample("b", "incorrect", "3", ref="2"),
    ]
    ev = evaluate_samples(problems, rows)
    assert ev["overall"]["graded"] == 3 and ev["overall"]["correct"] == 1
    assert ev["overall"]["pass@n"] == 1 and ev["overall"]["pass@n_rate"] == 0.5
    assert ev["by"]["bucket"]["small"]["accuracy"] == 1.0
    assert ev["by"]["bucket"]["large"]["accuracy"] == 0.0
    assert ev["by"]["domain"]["algebra"]["graded"] == 3
    assert ev["failures"]["error"]["count"] == 1 and ev["failures"]["wrong_value"]["count"] == 1
    assert ev["overall"]["ci95"] == list(wilson(1, 3))
    assert {r["metric"] for r in metric_rows(ev)} >= {"accuracy (all)", "failures: error"}
