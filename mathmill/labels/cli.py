"""The ``mathmill classify`` command's work: label every problem of a file with its
domain, write one JSON line per row, and sum up.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mathmill.errors import ConfigError
from mathmill.labels.domain import DEFAULT_RULES, DomainRules, classify
from mathmill.records import ErrorInfo, Problem
from mathmill.sources import FieldMap, read_problems

__all__ = ["ClassifySummary", "classify_file", "parse_domains", "print_summary"]


@dataclass
class ClassifySummary:
    """What a run of :func:`classify_file` did."""

    rows: int = 0
    bad_rows: int = 0
    seconds: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    domains: tuple[str, ...] = ()

    @property
    def rows_per_s(self) -> float:
        """Rows labelled per second (reading and writing included)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def parse_domains(text: str | None, rules: DomainRules = DEFAULT_RULES) -> DomainRules:
    """``rules`` cut down to the comma-separated ``text`` (``"algebra,geometry"``), or
    unchanged when ``text`` is empty; :class:`ConfigError` for a domain without keywords.
    """
    if not text or not text.strip():
        return rules
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"--domains names a domain twice: {text!r}")
    try:
        return rules.restrict(names)
    except ValueError as e:
        raise ConfigError(f"--domains: {e}") from e


def _field_text(problem: Problem, name: str | None) -> str | None:
    """The text of input field ``name`` of a problem (``solution`` or an extra field)."""
    if not name:
        return None
    if name == "solution":
        return problem.solution
    value = problem.metadata.get(name)
    return value if isinstance(value, str) else None


def classify_file(
    source: str,
    *,
    field: str = "problem",
    code_field: str | None = "code",
    plan_field: str | None = None,
    out: TextIO,
    errors: TextIO | None = None,
    rules: DomainRules = DEFAULT_RULES,
) -> ClassifySummary:
    """Label each problem of ``source`` (JSONL, Parquet, a dataset directory or
    ``hf:NAME``, read by :func:`mathmill.sources.read_problems`), writing one JSON line
    per row to ``out``: ``id``, ``domain``, ``confidence``, ``scores``, ``rule``,
    ``evidence``. A bad row is reported on ``errors`` (stderr) with where it was and
    skipped. ``code_field`` and ``plan_field`` name input fields (missing in a row:
    ignored) whose text adds code and plan signals.
    """
    errors = errors or sys.stderr
    fields = FieldMap(statement=field, answer=None, solution=None, source_id="id")
    summary = ClassifySummary(domains=rules.domains)
    start = time.perf_counter()
    for item in read_problems(source, fields):
        if isinstance(item, ErrorInfo):
            summary.bad_rows += 1
            print(f"warning: skipped: {item.message}", file=errors)
            continue
        label = classify(
            item.statement,
            _field_text(item, code_field),
            _field_text(item, plan_field),
            rules,
        )
        row = {"id": item.source_id or item.id, **label.to_dict()}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary.rows += 1
        summary.counts[label.domain] += 1
    summary.seconds = time.perf_counter() - start
    return summary


def run_classify(
    source: str,
    *,
    field: str,
    code_field: str | None,
    plan_field: str | None,
    out: str | None,
    domains: str | None,
) -> ClassifySummary:
    """:func:`classify_file` to the file ``out`` (written whole, then renamed into
    place) or, with no ``out``, to stdout.
    """
    rules = parse_domains(domains)
    if out is None:
        return classify_file(
            source,
            field=field,
            code_field=code_field,
            plan_field=plan_field,
            out=sys.stdout,
            rules=rules,
        )
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            summary = classify_file(
                source,
                field=field,
                code_field=code_field,
                plan_field=plan_field,
                out=f,
                rules=rules,
            )
        tmp.replace(path)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return summary


def print_summary(summary: ClassifySummary, *, stderr: bool) -> None:
    """A table of counts per domain, and rows/s (on stderr when rows go to stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=stderr, soft_wrap=True)
    table = Table(title="domains")
    table.add_column("domain")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    for domain in summary.domains:
        n = summary.counts.get(domain, 0)
        share = n / summary.rows if summary.rows else 0.0
        table.add_row(domain, f"{n:,}", f"{share:.1%}")
    console.print(table)
    bad = f", {summary.bad_rows:,} bad rows skipped" if summary.bad_rows else ""
    console.print(
        f"{summary.rows:,} rows in {summary.seconds:.2f} s ({summary.rows_per_s:,.0f} rows/s){bad}",
        markup=False,
        highlight=False,
    )
