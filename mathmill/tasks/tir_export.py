"""Exports of tir trajectories: ShareGPT, chat-template messages, the statistics."""

from __future__ import annotations

from collections import Counter

from pydantic import JsonValue

from mathmill.records import Attempt, Problem

__all__ = ["chat_messages", "conversation_id", "export_metadata", "sharegpt", "tir_stats"]


def conversation_id(problem: Problem, attempt: Attempt, samples: int) -> str:
    """The id of a trajectory in the exports: the source's id (else the problem id),
    with ``-s<sample>`` when there are several samples per problem.
    """
    base = problem.source_id or problem.id
    return f"{base}-s{attempt.sample_index}" if samples > 1 else base


_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


def export_metadata(problem: Problem, attempt: Attempt) -> dict[str, JsonValue]:
    """The ``metadata`` of an exported trajectory."""
    verdict = attempt.verdict
    return {
        **attempt.metadata,
        "final_answer": attempt.final_answer,
        "expected_answer": problem.answer,
        "verdict": verdict.status if verdict else None,
        "reason": verdict.reason if verdict else "",
        "problem_id": problem.id,
        "attempt_id": attempt.id,
        "source": problem.source,
        "model": attempt.model,
        "prompt_sha256": attempt.prompt.sha256 if attempt.prompt else None,
        "prompt_tokens": attempt.usage.prompt_tokens,
        "completion_tokens": attempt.usage.completion_tokens,
    }


def sharegpt(problem: Problem, attempt: Attempt, samples: int = 1) -> dict[str, JsonValue]:
    """A trajectory in ShareGPT form: ``{"id", "conversations": [{"from", "value"}],
    "metadata"}`` with ``from`` in system / human / gpt / tool.
    """
    return {
        "id": conversation_id(problem, attempt, samples),
        "conversations": [
            {"from": _SHAREGPT_ROLE[t.role], "value": t.content} for t in attempt.turns
        ],
        "metadata": export_metadata(problem, attempt),
    }


def chat_messages(problem: Problem, attempt: Attempt, samples: int = 1) -> dict[str, JsonValue]:
    """A trajectory as chat-template messages: ``{"id", "messages": [{"role",
    "content"}], "metadata"}`` with roles system / user / assistant / tool.
    """
    return {
        "id": conversation_id(problem, attempt, samples),
        "messages": [{"role": t.role, "content": t.content} for t in attempt.turns],
        "metadata": export_metadata(problem, attempt),
    }


def tir_stats(counts: Counter[str]) -> list[dict[str, JsonValue]]:
    """The statistics table: processed, successful, failed, success rate, average
    turns and code blocks, correct / incorrect / unknown, accuracy of the validated.
    """
    processed = counts["tir.processed"]
    failed = counts["tir.failed"]
    successful = processed - failed
    correct, incorrect = counts["tir.correct"], counts["tir.incorrect"]
    validated = correct + incorrect

    def ratio(a: int, b: int) -> str:
        return f"{100.0 * a / b:.1f}%" if b else "-"

    def mean(a: int) -> str:
        return f"{a / processed:.2f}" if processed else "-"

    rows: list[tuple[str, JsonValue]] = [
        ("processed", processed),
        ("successful", successful),
        ("failed", failed),
        ("success rate", ratio(successful, processed)),
        ("average turns", mean(counts["tir.model_turns"])),
        ("average code blocks", mean(counts["tir.code_blocks"])),
        ("correct", correct),
        ("incorrect", incorrect),
        ("unknown (no expected answer)", counts["tir.unvalidated"]),
        ("accuracy of the validated", ratio(correct, validated)),
        ("nudges", counts["tir.nudges"]),
        ("hallucinated tool blocks removed", counts["tir.hallucinated_tags"]),
    ]
    return [{"metric": k, "value": v} for k, v in rows]
