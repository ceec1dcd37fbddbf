"""The dataset report of a run: ``report.html`` and its charts (``report/*.png``) in
the run directory, local or on object storage; every run writes one at its end
(:func:`mathmill.pipeline.finish.finish_run`), ``mathmill report RUN_DIR`` re-renders
it for any run.

Modules: :mod:`~mathmill.report.data` (the figures, from the manifest and the
datasets), :mod:`~mathmill.report.charts` (one function per chart),
:mod:`~mathmill.report.html` (the page).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mathmill.storage import RunStore, StorageConfig

__all__ = ["Rendered", "render", "render_report", "render_run"]


@dataclass
class Rendered:
    """What :func:`render` wrote: file name -> URL (``report.html`` first), the
    markdown of the key figures, and the charts' PNG bytes by name.
    """

    files: dict[str, str] = field(default_factory=dict)
    markdown: str = ""
    pngs: dict[str, bytes] = field(default_factory=dict)

    @property
    def html_url(self) -> str:
        return self.files["report.html"]


def render(store: RunStore, manifest: dict[str, Any] | None = None) -> Rendered:
    """Gather the run's figures, draw the charts, write ``report/<chart>.png`` and
    ``report.html`` (last) under the run directory.
    """
    from mathmill.report.charts import render_charts
    from mathmill.report.data import gather
    from mathmill.report.html import key_figures_markdown, report_html

    data = gather(store, manifest)
    charts = render_charts(data)
    out = Rendered()
    for chart, png in charts:
        out.files[f"report/{chart.name}.png"] = store.write_bytes(f"report/{chart.name}.png", png)
        out.pngs[chart.name] = png
    page = report_html(data, [(chart, f"report/{chart.name}.png") for chart, _ in charts])
    html_url = store.write_bytes("report.html", page.encode("utf-8"))
    out.files = {"report.html": html_url, **out.files}
    out.markdown = key_figures_markdown(data, html_url)
    return out


def render_run(config: StorageConfig, manifest: dict[str, Any] | None = None) -> Rendered:
    """:func:`render` for the run directory ``config`` names: the work sent to the
    helper process (:mod:`mathmill.sidecar`), which opens the store itself.
    """
    return render(RunStore(config), manifest)


def render_report(store_or_url: RunStore | str) -> dict[str, str]:
    """Render the report of the run in ``store_or_url`` (a :class:`RunStore`, a local
    path or ``s3://bucket/prefix``); returns file name -> URL, ``report.html`` first.
    """
    store = store_or_url if isinstance(store_or_url, RunStore) else RunStore(store_or_url)
    return render(store).files
