"""The report page: one self-contained HTML file (figures inlined as data URIs, no scripts, no network)."""

from __future__ import annotations

import base64
import math
from html import escape
from typing import Any

from bloger_cli import __version__
from bloger_cli.report.collect import ReportRun

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; }
.notes li { color: #8a5a00; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _cell(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def metrics_tables(runs: list[ReportRun], ks: list[int], summary: list[dict[str, Any]]) -> str:
    if not ks:
        return "<p>No run has test metrics yet: run <code>bloger evaluate</code> or <code>bloger baseline</code>.</p>"
    names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    header = ["mode", "runs", *(n.replace("recall", "R").replace("ndcg", "N") for n in names)]
    rows = []
    for s in summary:
        cells = []
        for n in names:
            mean, half = s[n]
            cells.append(_cell(mean) + ("" if math.isnan(half) else f" ± {half:.4f}"))
        rows.append([escape(s["mode"]) + (" (baseline)" if s["stage"] == "baseline" else ""), str(s["runs"]), *cells])
    per_run = [[escape(r.label), escape(r.mode), "" if r.seed is None else str(r.seed),
                *(_cell(r.test.get(n)) for n in names)] for r in runs if r.test]
    return ("<h3>By mode: mean ± 95% interval over seeds</h3>" + _table(header, rows)
            + "<h3>Every run</h3>" + _table(["run", "mode", "seed", *header[2:]], per_run))


def page(title: str, runs: list[ReportRun], ks: list[int], summary: list[dict[str, Any]],
         figures: dict[str, tuple[str, str, bytes]], differences: dict[str, list[tuple[str, list[str]]]],
         notes: list[str]) -> str:
    """The whole page; figures maps a file name to (heading, caption, PNG bytes)."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
             f"<p>{len(runs)} runs from {len({r.workspace for r in runs})} workspaces; test users, item-level "
             f"metrics, full ranking. Made by bloger {escape(__version__)} (<code>bloger report</code>).</p>",
             "<h2>Runs</h2>",
             _table(["run", "stage", "mode", "seed", "workspace", "run id"],
                    [[escape(r.label), r.stage, escape(r.mode), "" if r.seed is None else str(r.seed),
                      escape(str(r.workspace)), escape(r.run_id)] for r in runs]),
             "<h2>Test metrics</h2>", metrics_tables(runs, ks, summary)]
    for name, (title, caption, png) in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{escape(title)}</h2><p>{escape(caption)}</p><figure><img "
                     f"src='data:image/png;base64,{data}' alt='{escape(title)}' data-file='{escape(name)}'></figure>")
    if differences:
        parts.append("<h2>Configs that differ between runs</h2>")
        for stage, rows in differences.items():
            labels = [r.label for r in runs if r.stage == stage]
            parts.append(f"<h3>{escape(stage)}</h3>" + _table(["key", *labels],
                                                              [[escape(k), *map(escape, v)] for k, v in rows]))
    if notes:
        parts.append("<h2>Notes</h2><ul class='notes'>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
