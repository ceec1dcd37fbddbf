"""The ``refresh`` flow: the nightly composition of the pipelines, writing a dated
version of the dataset.

Each run writes ``<root>/<version>/`` (the version defaults to the flow run's
*scheduled* date in UTC, so a late or retried nightly run fills the same version and
resumes it), then points ``<root>/latest.json`` at it and appends it to
``<root>/versions.jsonl``. ``root`` is the synthesize parameters' ``out`` (inside
their ``storage_block`` when set).

>>> version_name(datetime.datetime(2026, 11, 22, 3, 0, tzinfo=datetime.UTC))
'2026-11-22'
"""

from __future__ import annotations

import datetime
import json

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_link_artifact
from pydantic import BaseModel, ConfigDict, Field

from mathmill.flows.synthesize import SynthesizeConfig, SynthesizeResult, synthesize
from mathmill.storage import RunStore
from mathmill.tasks.export import dump_json

__all__ = ["RefreshConfig", "RefreshResult", "refresh", "version_name"]


class RefreshConfig(BaseModel):
    """Parameters of the refresh flow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    synthesize: SynthesizeConfig = Field(
        default_factory=lambda: SynthesizeConfig(out="datasets/refresh"),
        description="The synthesize run; its `out` is the root the dated versions go under.",
    )
    version: str | None = Field(
        None,
        pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$",
        description="Version name; default: the run's scheduled date in UTC (YYYY-MM-DD).",
        examples=["2026-11-22"],
    )


class RefreshResult(BaseModel):
    """Which version a refresh wrote, and its synthesize result."""

    version: str
    root: str
    synthesize: SynthesizeResult


def version_name(when: datetime.datetime) -> str:
    """The version a run scheduled at ``when`` writes: its UTC date."""
    return when.astimezone(datetime.UTC).date().isoformat()


def _scheduled() -> datetime.datetime:
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time
    if isinstance(when, datetime.datetime):
        return when
    return datetime.datetime.now(datetime.UTC)


@flow(name="refresh", validate_parameters=True, log_prints=False)
async def refresh(config: RefreshConfig | None = None) -> RefreshResult:
    """Run synthesize into ``<root>/<date>/`` and mark it as the latest version."""
    config = config or RefreshConfig()
    logger = get_run_logger()
    version = config.version or version_name(_scheduled())
    base = config.synthesize
    root = base.out.rstrip("/")
    run_cfg = base.model_copy(update={"out": f"{root}/{version}"})
    logger.info("refreshing version %s under %s", version, root)
    result = await synthesize(config=run_cfg)
    store = RunStore(await base.storage_config(root))
    entry = {
        "version": version,
        "path": result.out,
        "verified": result.verified,
        "unverified": result.unverified,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    history = store.read_bytes("versions.jsonl") if store.exists("versions.jsonl") else b""
    lines = [line for line in history.decode().splitlines() if line.strip()]
    lines = [line for line in lines if json.loads(line).get("version") != version]
    lines.append(json.dumps(entry, sort_keys=True))
    store.write_bytes("versions.jsonl", ("\n".join(lines) + "\n").encode())
    store.write_bytes("latest.json", dump_json(entry))
    await acreate_link_artifact(
        result.out, link_text=f"dataset {version}", key="refresh-latest", description="Latest"
    )
    logger.info("version %s: %d verified rows at %s", version, result.verified, result.out)
    return RefreshResult(version=version, root=store.url, synthesize=result)
