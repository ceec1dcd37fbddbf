"""Evaluation metrics of a model on a split (the AIMO pipeline's stage 10): accuracy
overall, by difficulty bucket, by domain and by structure tag, each with a Wilson 95%
interval over the graded samples (with several samples per problem they are not
independent: the interval is then too narrow; pass@n has its own over problems);
failure patterns (no answer, format, wrong value, truncated, error) with examples.

>>> wilson(8, 10)
(0.4902, 0.9433)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from mathmill.records import Problem, Sample
from mathmill.tasks.solve import answer_form

__all__ = ["FAILURES", "evaluate_samples", "failure_kind", "metric_rows", "wilson"]

FAILURES = ("no_answer", "format", "wrong_value", "truncated", "error")
EXAMPLES = 3


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def failure_kind(sample: Sample, written: str | None = None) -> str | None:
    """Why a sample is not right: ``truncated`` (ran out of tokens), ``no_answer``,
    ``format`` (an answer of another form than the reference as the source wrote it,
    ``written``: a decimal for a fraction, text for a number), ``wrong_value``, ``error``;
    None when correct or not gradable (no reference).
    """
    if sample.status in ("correct", "unvalidated"):
        return None
    if sample.status == "error":
        return "error"
    if sample.finish_reason == "length":
        return "truncated"
    if sample.status == "no_answer" or not sample.final_answer:
        return "no_answer"
    reference = written or sample.reference
    if reference and answer_form(reference) != answer_form(sample.final_answer):
        return "format"
    return "wrong_value"


def _tags(problem: Problem) -> dict[str, list[str]]:
    """The groups a problem belongs to: its bucket, domain and structure tags."""
    meta = problem.metadata
    structure = meta.get("structure")
    tags: dict[str, list[str]] = {
        "bucket": [str(meta.get("bucket") or "none")],
        "domain": [str(meta.get("domain") or problem.domain or "none")],
    }
    if isinstance(structure, dict):
        found: list[str] = []
        for key in ("subdomain",):
            if structure.get(key):
                found.append(f"{key}:{structure[key]}")
        for key in ("reasoning_patterns", "techniques"):
            value = structure.get(key)
            if isinstance(value, list):
                found += [f"{key}:{v}" for v in value if isinstance(v, str) and v]
        tags["structure"] = found
    return tags


def _group(samples: Iterable[Sample]) -> dict[str, Any]:
    """Accuracy over the graded samples: a failed request (``error``) counts as wrong;
    a sample with no reference (``unvalidated``) is not graded.
    """
    rows = list(samples)
    graded = [s for s in rows if s.status != "unvalidated"]
    correct = sum(s.status == "correct" for s in graded)
    low, high = wilson(correct, len(graded))
    return {
        "samples": len(rows),
        "graded": len(graded),
        "correct": correct,
        "accuracy": round(correct / len(graded), 4) if graded else None,
        "ci95": [low, high],
    }


def evaluate_samples(problems: Sequence[Problem], samples: Sequence[Sample]) -> dict[str, Any]:
    """The evaluation of ``samples`` (graded) of ``problems``: overall, per group
    (``bucket``, ``domain``, ``structure`` tags), pass@n per problem, failure patterns
    with up to three examples each.
    """
    by_id = {p.id: p for p in problems}
    groups: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    per_problem: dict[str, list[Sample]] = defaultdict(list)
    failures: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        per_problem[s.problem_id].append(s)
        problem = by_id.get(s.problem_id)
        if problem is not None:
            for group, values in _tags(problem).items():
                for v in values:
                    groups[group][v].append(s)
        written = problem.metadata.get("original_answer") if problem is not None else None
        if (kind := failure_kind(s, str(written) if written else None)) is not None:
            failures[kind].append(s)
    solved = sum(any(x.status == "correct" for x in v) for v in per_problem.values())
    problems_n = len(per_problem)
    return {
        "overall": _group(samples)
        | {
            "problems": problems_n,
            "pass@n": solved,
            "pass@n_rate": round(solved / problems_n, 4) if problems_n else None,
            "pass@n_ci95": list(wilson(solved, problems_n)),
        },
        "by": {
            group: {value: _group(rows) for value, rows in sorted(values.items())}
            for group, values in sorted(groups.items())
        },
        "failures": {
            kind: {
                "count": len(failures.get(kind, [])),
                "examples": [
                    {
                        "problem_id": s.problem_id,
                        "problem": s.problem[:300],
                        "reference": s.reference,
                        "answer": s.final_answer,
                        "text": s.text[-400:],
                    }
                    for s in failures.get(kind, [])[:EXAMPLES]
                ],
            }
            for kind in FAILURES
        },
    }


def metric_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation as ``{metric, value}`` rows (the report's statistics and the
    ``evaluate-stats`` table): accuracy with its interval and size, per group, then the
    failure counts.
    """
    rows = [{"metric": "accuracy (all)", "value": _cell(evaluation["overall"])}]
    o = evaluation["overall"]
    low, high = o["pass@n_ci95"]
    rows.append(
        {
            "metric": "problems solved (pass@n)",
            "value": f"{o['pass@n']}/{o['problems']} [{low:.3f}, {high:.3f}]",
        }
    )
    for group, values in evaluation["by"].items():
        rows += [
            {"metric": f"accuracy ({group} = {v})", "value": _cell(g)} for v, g in values.items()
        ]
    for kind, f in evaluation["failures"].items():
        rows.append({"metric": f"failures: {kind}", "value": f["count"]})
    return rows


def _cell(g: dict[str, Any]) -> str:
    low, high = g["ci95"]
    accuracy = "n/a" if g["accuracy"] is None else f"{g['accuracy']:.3f}"
    return f"{accuracy} [{low:.3f}, {high:.3f}] n={g['graded']}"
