"""The ``mathmill report RUN_DIR`` command's work: re-render a run's dataset report
(``report.html`` and ``report/*.png``) from what its run directory holds.
"""

from __future__ import annotations

import time

from mathmill.storage import RunStore, StorageConfig

__all__ = ["run_report"]


def run_report(run_dir: str, endpoint_url: str | None = None) -> tuple[dict[str, str], float]:
    """Render the report of the run in ``run_dir`` (a local path or ``s3://...``; on an
    S3-compatible server, ``endpoint_url`` or ``$MATHMILL_S3_ENDPOINT_URL``); returns
    the files written (``report.html`` first) and the seconds it took.
    """
    from mathmill.report import render_report

    started = time.perf_counter()
    config = StorageConfig(url=run_dir)
    if endpoint_url:
        config = config.model_copy(update={"endpoint_url": endpoint_url})
    store = RunStore(config)
    if store.is_local and not store.exists("manifest.json"):
        from mathmill.errors import ConfigError

        raise ConfigError(f"{run_dir}: no manifest.json here: not a mathmill run directory")
    files = render_report(store)
    return files, time.perf_counter() - started
