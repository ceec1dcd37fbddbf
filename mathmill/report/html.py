"""``report.html``: the run's key figures and its charts (``report/<name>.png`` next to
it), one self-contained page (inline CSS, no scripts, every text escaped).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from mathmill.report.charts import Chart
from mathmill.report.data import RunData

__all__ = ["key_figures", "key_figures_markdown", "report_html"]

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #222; background: #f6f6f4; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
.where { color: #666; font-size: 13px; margin: 0 0 20px; word-break: break-all; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px;
  background: #dcebd5; color: #245a14; vertical-align: middle; }
.status.bad { background: #f6d8d1; color: #8a2a12; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; margin: 0 0 20px; }
.card { background: #fff; border: 1px solid #e4e4e0; border-radius: 6px; padding: 6px 12px;
  min-width: 120px; }
.card b { display: block; font-size: 18px; font-variant-numeric: tabular-nums; }
.card span { color: #666; font-size: 12px; }
table { border-collapse: collapse; background: #fff; margin: 0 0 24px; }
th, td { text-align: left; padding: 5px 14px; border-bottom: 1px solid #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
section { background: #fff; border: 1px solid #e4e4e0; border-radius: 6px;
  padding: 12px 16px; margin: 0 0 18px; }
section img { max-width: 100%; height: auto; display: block; }
nav a { margin-right: 12px; font-size: 13px; }
footer { color: #888; font-size: 12px; }
"""


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def key_figures(data: RunData) -> list[tuple[str, str]]:
    """The run's headline numbers as (label, value) rows."""
    rows: list[tuple[str, str]] = [("status", data.status)]
    skip = {"out", "dry_run", "wall_s", "counts", "usage", "outputs", "stages", "stats"}
    for key, value in data.result.items():
        if key not in skip and isinstance(value, int | float) and not isinstance(value, bool):
            rows.append((key.replace("_", " "), _number(value)))
    seen = {label for label, _ in rows}
    for key, value in (data.result.get("stats") or {}).items():
        if str(key).replace("_", " ") not in seen:
            rows.append((str(key), str(value)))
    total = data.usage.get("total") or {}
    if total.get("calls") or total.get("prompt_tokens"):
        rows.append(
            ("LLM calls (cached)", f"{_number(total['calls'])} ({_number(total.get('cached', 0))})")
        )
        rows.append(
            (
                "tokens (prompt / completion)",
                f"{_number(total.get('prompt_tokens', 0))} / "
                f"{_number(total.get('completion_tokens', 0))}",
            )
        )
        rows.append(("cost", f"${float(total.get('cost_usd', 0.0)):.4f}"))
    if total.get("sandbox_s"):
        rows.append(("sandbox time", f"{float(total['sandbox_s']):.1f} s"))
    if total.get("gpu_s"):
        rows.append(("GPU time", f"{float(total['gpu_s']):.1f} s"))
    if data.result.get("wall_s"):
        rows.append(("wall time", f"{float(data.result['wall_s']):.1f} s"))
    return rows


def key_figures_markdown(data: RunData, html_url: str | None) -> str:
    """The key figures as a markdown table (the Prefect artifact), with where the
    full report is.
    """
    lines = [f"# {data.pipeline} run: dataset report", ""]
    if html_url:
        lines += [f"Charts and figures: `{html_url}`", ""]
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in key_figures(data)]
    lines += ["", "| dataset | rows |", "|---|---|"]
    lines += [f"| {name} | {n:,} |" for name, n in sorted(data.datasets.items())]
    return "\n".join(lines) + "\n"


def report_html(data: RunData, charts: Sequence[tuple[Chart, str]]) -> str:
    """The page: key figures, each chart, rows per dataset (``(chart, relative src)``)."""
    bad = "complete" not in data.status
    head = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(data.pipeline)} run report</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style></head><body><main>"
    )
    parts = [
        head,
        f"<h1>{escape(data.pipeline)} run: dataset report "
        f'<span class="status{" bad" if bad else ""}">{escape(data.status)}</span></h1>',
        f'<p class="where">{escape(data.url)}</p>',
    ]
    if charts:
        links = " ".join(f'<a href="#{escape(c.name)}">{escape(c.title)}</a>' for c, _ in charts)
        parts.append(f"<nav>{links}</nav>")
    parts.append('<h2>Key figures</h2><div class="cards">')
    parts += [
        f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>'
        for k, v in key_figures(data)
    ]
    parts.append("</div>")
    for chart, src in charts:  # each PNG carries its title
        parts.append(
            f'<section id="{escape(chart.name)}" aria-label="{escape(chart.title)}">'
            f'<img src="{escape(src)}" alt="{escape(chart.title)}"></section>'
        )
    if not charts:
        parts.append("<p>No charts: the run wrote no rows to chart.</p>")
    if data.datasets:
        parts.append("<h2>Rows per dataset</h2><table><tr><th>dataset</th><th>rows</th></tr>")
        parts += [
            f'<tr><td>{escape(name)}</td><td class="n">{n:,}</td></tr>'
            for name, n in sorted(data.datasets.items())
        ]
        parts.append("</table>")
    parts.append(
        "<footer>Counts, usage and times in full: <code>report.md</code>; "
        "params and every chunk: <code>manifest.json</code>.</footer></main></body></html>\n"
    )
    return "\n".join(parts)
