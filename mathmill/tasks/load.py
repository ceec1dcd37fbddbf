"""The load stage, shared by the pipelines that read problems (tir, sample): the input
read into chunks of problems; malformed and duplicate rows go to ``dropped`` with where
they were and why.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import ConfigError
from mathmill.pipeline.chunks import drop, split_rows
from mathmill.pipeline.stage import Chunk, StageResult, stage
from mathmill.records import Dropped, ErrorInfo, Problem
from mathmill.sources import FieldMap, read_problems

__all__ = ["LoadConfig", "load"]


class LoadConfig(BaseModel):
    """The input and how to read it (see ``InputFields.load_config``); ``identity`` (a
    file's content hash, a directory's listing) puts the input's content in the cache
    key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    identity: str
    split: str = "test"
    id_field: str | None = "id"
    prompt_field: str = "problem"
    answer_field: str | None = "answer"
    limit: int | None = Field(None, ge=1)
    chunk_size: int = Field(200, ge=1)


@stage("load", params=LoadConfig, kind="source", outputs={"problems": Problem})
async def load(chunk: Chunk, cfg: LoadConfig) -> StageResult:
    """Read the input into chunks of problems; malformed rows go to ``dropped``."""
    fields = FieldMap(
        statement=cfg.prompt_field, answer=cfg.answer_field, solution=None, source_id=cfg.id_field
    )
    problems: list[Problem] = []
    dropped: list[Dropped] = []
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for item in read_problems(cfg.input, fields, split=cfg.split, limit=cfg.limit):
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
        elif item.id in seen:
            counts["load.duplicate"] += 1
            dropped.append(drop("load", "duplicate", item, item.id, "same statement"))
        else:
            seen.add(item.id)
            problems.append(item)
    if not problems:  # a wrong field name or an empty file: say so, do not run empty
        first = f"; first: {dropped[0].detail}" if dropped else ""
        raise ConfigError(
            f"input {cfg.input}: no problems in it ({len(dropped)} rows dropped{first})"
        )
    counts["load.problems"] = len(problems)
    return StageResult(
        rows=dict(split_rows("problems", problems, cfg.chunk_size)), dropped=dropped, counts=counts
    )
