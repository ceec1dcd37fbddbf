"""Output stages shared by the flows: JSONL exports, stale-chunk cleanup, count tables
and the run report.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

from mathmill.codec import to_json_lines
from mathmill.errors import StorageError
from mathmill.llm.usage import UsageMeter
from mathmill.records import RECORD_TYPES
from mathmill.storage import ChunkRef, RunStore

__all__ = [
    "count_rows",
    "export_jsonl",
    "remove_stale_chunks",
    "report_markdown",
    "write_run_file",
]

log = logging.getLogger("mathmill")


def write_run_file(store: RunStore, relpath: str, data: bytes, *, failed: bool) -> bool:
    """Write a run's report or manifest; whether it was written. When the run has
    already failed (``failed``), a storage error here (the endpoint that failed the
    chunks is still down) is logged instead of raised, so that the run's own error,
    which chunks did not finish, why, and how to resume, is the one the user sees.
    """
    try:
        store.write_bytes(relpath, data)
    except StorageError as e:
        if not failed:
            raise
        log.warning("could not write %s of the stopped run: %s", relpath, e)
        return False
    return True


def export_jsonl(store: RunStore, relpath: str, refs: Sequence[ChunkRef]) -> str:
    """Write the rows of ``refs`` as one JSONL file (streamed chunk by chunk)."""

    def lines() -> Iterator[bytes]:
        for ref in refs:
            table = store.dataset(ref.dataset).read_table(ref)
            for line in to_json_lines(table, RECORD_TYPES[ref.record_type]):
                yield line + b"\n"

    return store.write_stream(relpath, lines())


def remove_stale_chunks(store: RunStore, datasets: Sequence[str], keep: Sequence[ChunkRef]) -> int:
    """Delete chunks of ``datasets`` that this run did not produce (left by an earlier
    run with other settings in the same directory), so the directory holds one
    consistent dataset; old temporaries of killed writes go too. Returns how many chunks
    were removed.
    """
    wanted = {(ref.dataset, ref.key) for ref in keep}
    removed = 0
    for name in datasets:
        dataset = store.dataset(name)
        dataset.remove_temporaries()
        for key in list(dataset.keys()):
            if (name, key) not in wanted:
                dataset.delete_chunk(key)
                removed += 1
    return removed


def count_rows(counts: Mapping[str, int]) -> list[dict[str, object]]:
    """``stage.outcome -> n`` counts as table rows (stage, outcome, rows), in stage order.

    >>> [r["stage"] for r in count_rows({"verify.unverified.leak": 2, "topics.kept": 5})]
    ['topics', 'verify']
    """
    order = ["topics", "problems", "dedup", "cots", "verify"]

    def rank(key: str) -> tuple[int, str]:
        stage = key.split(".", 1)[0]
        return (order.index(stage) if stage in order else len(order), key)

    rows: list[dict[str, object]] = []
    for key in sorted(counts, key=rank):
        stage, _, outcome = key.partition(".")
        rows.append({"stage": stage, "outcome": outcome or "-", "rows": counts[key]})
    return rows


def report_markdown(
    title: str,
    counts: Counter[str],
    meter: UsageMeter,
    timings: Mapping[str, tuple[int, int, float]],
    outputs: Mapping[str, str],
    wall_s: float,
) -> str:
    """The run report: outputs, counts by stage and outcome, LLM usage and cost, time."""
    lines = [f"# {title}", "", "## Outputs", ""]
    lines += [f"- **{name}**: `{path}`" for name, path in outputs.items()]
    lines += ["", "## Rows by stage and outcome", "", "| stage | outcome | rows |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['outcome']} | {r['rows']} |" for r in count_rows(counts)]
    lines += ["", "## LLM calls, tokens and cost by stage", "", meter.to_markdown()]
    lines += [
        "",
        "## Time by stage",
        "",
        "| stage | chunks | reused | busy s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {n} | {r} | {t:.1f} |" for s, (n, r, t) in timings.items()]
    lines += ["", f"Wall time: {wall_s:.1f} s", ""]
    return "\n".join(lines)


def dump_json(value: object) -> bytes:
    """Pretty JSON bytes for small run files."""
    return json.dumps(value, indent=1, sort_keys=True, default=str).encode("utf-8")
