"""The ``refresh`` flow: the nightly composition of any list of pipelines, writing a
dated version of the dataset.

Each run writes ``<root>/<version>/<name>/`` for every configured pipeline (the
version defaults to the flow run's *scheduled* date in UTC, so a late or retried
nightly run fills the same version and resumes it); when all of them completed, it
points ``<root>/latest.json`` at the version and appends it to
``<root>/versions.jsonl``. ``root`` is inside ``storage_block`` when that is set; the
storage settings apply to every pipeline.

>>> version_name(datetime.datetime(2026, 11, 22, 3, 0, tzinfo=datetime.UTC))
'2026-11-22'
>>> [p.dirname for p in RefreshParams().pipelines]
['synthesize']
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Literal

from prefect import get_run_logger
from prefect.artifacts import acreate_link_artifact
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from mathmill.errors import ConfigError, IncompleteRun
from mathmill.flows.options import StorageFields
from mathmill.flows.registry import entry
from mathmill.pipeline.flow import pipeline_flow
from mathmill.storage import RunStore
from mathmill.tasks.export import dump_json

__all__ = ["PipelineRun", "RefreshParams", "RefreshResult", "refresh", "version_name"]

_STORAGE = ("storage_endpoint_url", "storage_block", "results_block")


class PipelineRun(BaseModel):
    """One pipeline of the refresh: which, where in the version, with which params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: Literal["synthesize", "tir", "sample"] = Field(description="The pipeline.")
    name: str | None = Field(
        None,
        pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$",
        description="Its directory in the version (default: the pipeline's name).",
    )
    params: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="The pipeline's params (as for `mathmill run`), without `out`.",
    )

    @property
    def dirname(self) -> str:
        """The pipeline's directory inside the version."""
        return self.name or self.pipeline


class RefreshParams(StorageFields):
    """Parameters of the refresh flow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = Field(
        "datasets/refresh",
        description="Where the dated versions go: a path, s3://bucket/prefix, or a path "
        "inside storage_block.",
    )
    version: str | None = Field(
        None,
        pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$",
        description="Version name; default: the run's scheduled date in UTC (YYYY-MM-DD).",
        examples=["2026-11-22"],
    )
    pipelines: list[PipelineRun] = Field(
        default_factory=lambda: [
            PipelineRun(pipeline="synthesize", params={"topics": 10, "problems_per_topic": 2})
        ],
        min_length=1,
        description="The pipelines the version is made of, run one after another.",
    )

    @model_validator(mode="after")
    def _check(self) -> RefreshParams:
        names = [p.dirname for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError(f"pipelines: two write to the same directory ({names})")
        for run in self.pipelines:
            if "out" in run.params:
                raise ValueError(f"pipelines.{run.dirname}.params.out: set by the refresh")
        return self

    def resolved(self, version: str) -> list[tuple[PipelineRun, Any]]:
        """Each pipeline with its validated params (``out`` inside the version, the
        refresh's storage settings), before anything runs; a bad one names itself.
        """
        from pydantic import ValidationError

        storage = {k: v for k, v in self.model_dump(include=set(_STORAGE)).items() if v}
        out = []
        for run in self.pipelines:
            _, pipeline = entry(run.pipeline).load()
            where = f"{self.root.rstrip('/')}/{version}/{run.dirname}"
            try:
                params = pipeline.params.model_validate(storage | run.params | {"out": where})
            except ValidationError as e:
                first = e.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise ConfigError(
                    f"pipelines.{run.dirname}.params.{field}: {first['msg']}"
                ) from None
            pipeline.stage_params(params)
            out.append((run, params))
        return out


class RefreshResult(BaseModel):
    """Which version a refresh wrote, and each pipeline's result."""

    version: str
    root: str
    results: dict[str, dict[str, Any]] = Field(default_factory=dict)


def version_name(when: datetime.datetime) -> str:
    """The version a run scheduled at ``when`` writes: its UTC date."""
    return when.astimezone(datetime.UTC).date().isoformat()


def _scheduled() -> datetime.datetime:
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time
    if isinstance(when, datetime.datetime):
        return when
    return datetime.datetime.now(datetime.UTC)


def _summary(result: BaseModel) -> dict[str, Any]:
    """A pipeline result's place and scalar figures, for versions.jsonl."""
    fields = result.model_dump(mode="json")
    keep = {k: v for k, v in fields.items() if isinstance(v, int | float) and k != "wall_s"}
    return {"path": fields["out"], **keep}


@pipeline_flow("refresh")
async def refresh(params: RefreshParams | None = None) -> RefreshResult:
    """Run the configured pipelines into ``<root>/<version>/`` and mark it latest."""
    params = params or RefreshParams()
    logger = get_run_logger()
    version = params.version or version_name(_scheduled())
    runs = params.resolved(version)  # every pipeline's params valid before any call
    store = RunStore(await params.storage_config(params.root.rstrip("/")))
    logger.info("refreshing version %s under %s: %d pipelines", version, store.url, len(runs))
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, BaseException] = {}
    for run, run_params in runs:
        where = entry(run.pipeline)
        pipeline_flow, _ = where.load()
        try:
            result = await pipeline_flow(**{where.param: run_params})
        except Exception as e:  # the next pipelines still run; the version is not marked
            failures[run.dirname] = e
            logger.error("%s: %s", run.dirname, e)
            continue
        results[run.dirname] = _summary(result)
    if failures:
        name, first = next(iter(failures.items()))
        raise IncompleteRun(
            f"refresh {version}: {len(failures)} of {len(runs)} pipelines did not finish "
            f"({name}: {first}); latest.json still names the previous version; re-run to "
            "resume"
        ) from first
    path = f"{store.url}/{version}"
    entry_ = {
        "version": version,
        "path": path,
        "pipelines": results,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    history = store.read_bytes("versions.jsonl") if store.exists("versions.jsonl") else b""
    lines = [line for line in history.decode().splitlines() if line.strip()]
    lines = [line for line in lines if json.loads(line).get("version") != version]
    lines.append(json.dumps(entry_, sort_keys=True))
    store.write_bytes("versions.jsonl", ("\n".join(lines) + "\n").encode())
    store.write_bytes("latest.json", dump_json(entry_))
    await acreate_link_artifact(
        path, link_text=f"dataset {version}", key="refresh-latest", description="Latest"
    )
    logger.info("version %s at %s: %s", version, path, json.dumps(results))
    return RefreshResult(version=version, root=store.url, results=results)
