"""The end of every run: JSONL exports, stale chunks removed, the report, the
manifest, the artifacts (counts table, report, the pipeline's own tables, progress),
and the incomplete-run error when chunks failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel, Field

from mathmill.pipeline.budget import budget_message, save_spend
from mathmill.pipeline.dag import RunState
from mathmill.tasks.export import (
    count_rows,
    dump_json,
    export_jsonl,
    remove_stale_chunks,
    report_markdown,
    write_run_file,
)

__all__ = ["RunResult", "finish_run"]


class RunResult(BaseModel):
    """Where a run's outputs are, its counts, LLM usage and time (every pipeline's
    result has these fields; a pipeline adds its own).
    """

    out: str
    dry_run: bool = False
    counts: dict[str, int] = Field(default_factory=dict)
    usage: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="LLM calls, cached calls, tokens, cost by stage."
    )
    outputs: dict[str, str] = Field(default_factory=dict)
    stages: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per stage: chunks, chunks reused, busy seconds."
    )
    stats: dict[str, Any] = Field(
        default_factory=dict, description="The pipeline's statistics (metric -> value)."
    )
    wall_s: float = 0.0


def _logger(prefect: bool) -> Any:
    if prefect:
        from prefect import get_run_logger

        return get_run_logger()
    import logging

    return logging.getLogger("mathmill.pipeline")


async def finish_run(state: RunState) -> Any:
    """Write the run's exports, report and manifest, publish its artifacts; raise
    :class:`~mathmill.errors.IncompleteRun` when chunks failed (what finished is kept).
    """
    from mathmill.errors import ConfigError, IncompleteRun

    pipeline, store, failed = state.pipeline, state.rt.store, bool(state.failures)
    logger = _logger(state.prefect)
    by_dataset = state.by_dataset()
    outputs = {name: f"{store.url}/{name}/" for name in pipeline.listed}
    if not failed:
        for name in pipeline.exports:
            outputs[f"{name}.jsonl"] = export_jsonl(
                store, f"{name}.jsonl", by_dataset.get(name, [])
            )
        if pipeline.extra_exports is not None:
            outputs |= pipeline.extra_exports(state)
        removed = remove_stale_chunks(store, pipeline.datasets(), state.refs)
        if removed:
            logger.info("removed %d chunks left by an earlier run with other settings", removed)
    outputs["report"] = f"{store.url}/report.md"
    chunks = sum(s.planned for s in state.tracker.stages.values())
    status = "complete" if not failed else f"INCOMPLETE ({len(state.failures)} chunks failed)"
    wall = time.perf_counter() - state.started
    timings = state.tracker.timing_table()
    report = report_markdown(
        f"{pipeline.name} run: {status}",
        state.tracker.counts,
        state.rt.pool.meter,
        timings,
        outputs,
        wall,
    )
    stats: list[dict[str, Any]] = pipeline.stats(state) if pipeline.stats is not None else []
    sections = [pipeline.report(state)] if pipeline.report is not None else []
    if stats:
        sections.append(_stats_markdown(stats))
    if sections:
        report = report.replace("## Rows by stage", "\n\n".join([*sections, "## Rows by stage"]), 1)
    write_run_file(store, "report.md", report.encode(), failed=failed)
    fields = pipeline.summary(state) if pipeline.summary is not None else {}
    if stats:
        fields["stats"] = {str(r["metric"]): r["value"] for r in stats}
    result = pipeline.result(
        out=store.url,
        counts=dict(state.tracker.counts),
        usage=state.rt.pool.meter.summary(),
        outputs=outputs,
        stages={
            name: {"chunks": n, "reused": r, "busy_s": round(t, 3)}
            for name, (n, r, t) in timings.items()
        },
        wall_s=wall,
        **fields,
    )
    manifest = {
        "pipeline": pipeline.name,
        "stages": [step.stage.name for step in pipeline.steps],
        "status": status,
        "params": _public(state.params.model_dump(mode="json")),
        "result": result.model_dump(mode="json"),
        "chunks": {k: [r.model_dump(mode="json") for r in v] for k, v in by_dataset.items()},
    }

    async def publish() -> None:
        try:
            await state.tracker.flush()  # the chunks' progress updates, sent meanwhile
        except Exception as e:  # the progress bar is a convenience: the run is done
            logger.warning("could not update the run's progress artifact: %s", e)
        sends = _artifacts(state, report, status, stats)
        if not failed:  # the progress artifact at 100, sent with them
            sends.append(state.tracker.publish("done", finished=True))
        await asyncio.gather(*sends)

    # the artifacts are sent while the report is drawn (in the helper process)
    sending = asyncio.ensure_future(publish()) if state.prefect else None
    try:
        rendered = await _dataset_report(state, manifest, logger)
        if rendered is not None:
            result.outputs["report.html"] = manifest["result"]["outputs"]["report.html"] = (
                rendered.html_url
            )
        write_run_file(store, "manifest.json", dump_json(manifest), failed=failed)
        save_spend(state.rt)
    except BaseException:  # the manifest could not be written: nothing left running
        if sending is not None:
            sending.cancel()
            with contextlib.suppress(BaseException):
                await sending
        raise
    if sending is not None:
        await sending
        if rendered is not None:
            await _report_artifacts(state, rendered, status, logger)
    if failed:
        for error in state.failures:  # bad settings: say so, re-running won't help
            if isinstance(error, ConfigError):
                raise error
        first = state.failures[0]
        if (spent := budget_message(state.rt)) is not None:
            raise IncompleteRun(
                f"{pipeline.name}: {len(state.failures)} of {chunks} chunks did not finish: "
                f"{spent}; finished rows are kept in {store.url}"
            ) from first
        raise IncompleteRun(
            f"{pipeline.name}: {len(state.failures)} of {chunks} chunks did not finish "
            f"(first: {first}); finished rows are kept in {store.url}; re-run the same "
            "command to resume"
        ) from first
    logger.info("%s: %s", pipeline.name, _headline(result))
    return result


def _public(params: dict[str, Any]) -> dict[str, Any]:
    """The params as the manifest shows them: an endpoint URL's credentials masked."""
    from mathmill.storage import masked_url

    url = params.get("storage_endpoint_url")
    return params | {"storage_endpoint_url": masked_url(url)} if url else params


def _stats_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["## Statistics", "", "| metric | value |", "|---|---|"]
    return "\n".join(lines + [f"| {r['metric']} | {r['value']} |" for r in rows])


def _artifacts(
    state: RunState, report: str, status: str, stats: list[dict[str, Any]]
) -> list[Awaitable[Any]]:
    """The sends of the counts table, the statistics and the report (one Prefect API
    call each, independent of one another: awaited together).
    """
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    name = state.pipeline.name
    sends: list[Awaitable[Any]] = [
        acreate_table_artifact(
            count_rows(state.tracker.counts),
            key=f"{name}-counts",
            description=f"Rows by stage and outcome ({status})",
        )
    ]
    if stats:
        sends.append(
            acreate_table_artifact(
                stats, key=f"{name}-stats", description=f"{name} statistics ({status})"
            )
        )
    sends.append(
        acreate_markdown_artifact(report, key=f"{name}-report", description=f"{name} run report")
    )
    return sends


async def _dataset_report(state: RunState, manifest: dict[str, Any], logger: Any) -> Any:
    """``report.html`` and its charts (:mod:`mathmill.report`), drawn in the helper
    process (:mod:`mathmill.sidecar`) for a local or S3 run directory (others may need
    credentials the helper is not given), else or where there is none in a worker
    thread; None, with a warning, when that fails: a chart never fails a run.
    """
    from mathmill import sidecar

    try:
        from mathmill.report import render, render_run

        store = state.rt.store
        if store.is_local:  # by its absolute path (the helper's cwd may differ)
            config = store.config.model_copy(update={"url": store.url})
        elif store.url.startswith("s3://"):
            config = store.config
        else:
            return await asyncio.to_thread(render, store, manifest)
        return await sidecar.call(render_run, config, manifest, limit_s=_REPORT_S, in_thread=True)
    except Exception as e:  # the report is a convenience: the run is done
        logger.warning("could not write the dataset report (report.html): %s", e)
        return None


async def _report_artifacts(state: RunState, rendered: Any, status: str, logger: Any) -> None:
    """The dataset report's Prefect artifacts: ``<pipeline>-dataset-report`` (markdown:
    key figures, where report.html is), ``<pipeline>-report-html`` (a link to it) and
    ``<pipeline>-report-chart`` (the rows-by-outcome chart as an image).
    """
    import base64

    from prefect.artifacts import (
        acreate_image_artifact,
        acreate_link_artifact,
        acreate_markdown_artifact,
    )

    name, url = state.pipeline.name, rendered.html_url
    link = f"file://{url}" if url.startswith("/") else url
    sends = [
        acreate_markdown_artifact(
            rendered.markdown,
            key=f"{name}-dataset-report",
            description=f"{name} dataset report: key figures ({status})",
        ),
        acreate_link_artifact(
            link,
            link_text="report.html",
            key=f"{name}-report-html",
            description=f"{name} dataset report with charts",
        ),
    ]
    png = rendered.pngs.get("rows")
    if png is not None and len(png) <= _IMAGE_ARTIFACT_MAX:
        sends.append(
            acreate_image_artifact(
                "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                key=f"{name}-report-chart",
                description=f"{name}: rows by stage and outcome",
            )
        )
    for outcome in await asyncio.gather(*sends, return_exceptions=True):
        if isinstance(outcome, Exception):  # artifacts are a convenience
            logger.warning("could not publish the dataset report's artifacts: %s", outcome)


_REPORT_S = 300.0
"""Seconds the helper process may take to draw the report before it is drawn here."""
_IMAGE_ARTIFACT_MAX = 400_000
"""Bytes of PNG sent inline (as a data: URL) as the image artifact, at most."""


def _headline(result: BaseModel) -> str:
    """The result's scalar fields, for the log's last line."""
    skip = {"out", "dry_run", "wall_s"}
    fields = result.model_dump()
    parts = [f"{k}={v}" for k, v in fields.items() if k not in skip and isinstance(v, int | float)]
    return ", ".join([*parts, f"in {fields['out']}"])
