"""The load stage, shared by the pipelines that read problems (tir, sample): the input (a
file, a dataset or a SQL database) read into chunks of problems; malformed, duplicate and
domain-filtered rows go to ``dropped`` with where they were and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import ConfigError
from mathmill.pipeline.chunks import drop, split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.records import Dropped, ErrorInfo, Problem
from mathmill.sources import FieldMap
from mathmill.sources_sql import SqlSource, read_input

__all__ = ["LoadConfig", "load"]


class LoadConfig(BaseModel):
    """The input and how to read it (see ``InputFields.load_config``); ``identity`` (a
    file's content hash, a directory's listing, a SQL source's rows hashed) puts the
    input's content in the cache key. With ``sql`` set the rows come from it, not from
    ``input``; with ``domain_field`` and ``domains`` only the rows of those domains stay.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    identity: str
    split: str = "test"
    id_field: str | None = "id"
    prompt_field: str = "problem"
    answer_field: str | None = "answer"
    limit: int | None = Field(None, ge=1)
    sql: SqlSource | None = None
    domain_field: str | None = None
    domains: list[str] | None = None
    chunk_size: int = Field(200, ge=1)

    @property
    def input_name(self) -> str:
        """The input as messages name it (a SQL source without its password)."""
        return self.sql.describe() if self.sql is not None else self.input


@stage("load", params=LoadConfig, kind="source", outputs={"problems": Problem})
async def load(chunk: Chunk, cfg: LoadConfig) -> StageResult:
    """Read the input into chunks of problems; malformed, duplicate and domain-filtered
    rows go to ``dropped``.
    """
    fields = FieldMap(
        statement=cfg.prompt_field, answer=cfg.answer_field, solution=None, source_id=cfg.id_field
    )
    keep = None
    if cfg.domain_field and cfg.domains:
        keep = _DomainFilter(cfg.domain_field, cfg.domains, fields)
    if keep is None:
        items = read_input(cfg.input, cfg.sql, fields, split=cfg.split, limit=cfg.limit)
    else:  # the limit counts the problems that pass the filter
        items = _limit(read_input(cfg.input, cfg.sql, fields, split=cfg.split), cfg.limit, keep)
    problems: list[Problem] = []
    dropped: list[Dropped] = []
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for item in items:
        if isinstance(item, ErrorInfo):
            counts["load.malformed_row"] += 1
            where = item.message.split(": ", 1)[0]
            dropped.append(
                Dropped(
                    stage="load",
                    reason="malformed_row",
                    detail=item.message,
                    target_id=where,
                    record_type="ErrorInfo",
                    record=item.model_dump(mode="json"),
                )
            )
        elif keep is not None and not keep(item):
            counts["load.domain_filtered"] += 1
            detail = f"{cfg.domain_field} {keep.value(item)!r} is not one of {cfg.domains}"
            dropped.append(drop("load", "domain_filtered", item, item.id, detail))
        elif item.id in seen:
            counts["load.duplicate"] += 1
            dropped.append(drop("load", "duplicate", item, item.id, "same statement"))
        else:
            seen.add(item.id)
            problems.append(item)
    if not problems:  # a wrong field name or an empty file: say so, do not run empty
        first = f"; first: {dropped[0].detail}" if dropped else ""
        raise ConfigError(
            f"input {cfg.input_name}: no problems in it ({len(dropped)} rows dropped{first})"
        )
    counts["load.problems"] = len(problems)
    return StageResult(
        rows=dict(split_rows("problems", problems, cfg.chunk_size)), dropped=dropped, counts=counts
    )


class _DomainFilter:
    """Whether a problem's input field ``field`` (a field the load reads, a column kept in
    its metadata, its source or license) is one of ``domains``, in any case.
    """

    def __init__(self, field: str, domains: Iterable[str], fields: FieldMap) -> None:
        self.field = field
        self.fields = fields
        self.domains = {d.strip().casefold() for d in domains}

    def value(self, problem: Problem) -> object:
        """The problem's value of the field (None when it has none)."""
        read = {
            self.fields.statement: problem.statement,
            self.fields.answer: problem.answer,
            self.fields.source_id: problem.source_id,
            "source": problem.source,
            "license": problem.license,
        }
        if self.field in problem.metadata:
            return problem.metadata[self.field]
        return read.get(self.field)

    def __call__(self, problem: Problem) -> bool:
        value = self.value(problem)
        return value is not None and str(value).strip().casefold() in self.domains


def _limit(
    items: Iterator[Problem | ErrorInfo], limit: int | None, keep: _DomainFilter
) -> Iterator[Problem | ErrorInfo]:
    """``items`` until ``limit`` problems that ``keep`` keeps went by."""
    kept = 0
    for item in items:
        if limit is not None and kept >= limit:
            break
        kept += isinstance(item, Problem) and keep(item)
        yield item
    close = getattr(items, "close", None)
    if close is not None:
        close()  # the rest of a stream (a SQL cursor) is not needed
