"""Rendering of stage results: rich tables on stderr, or one JSON object on stdout with --json."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

err = Console(stderr=True)


def emit(result: dict[str, Any], as_json: bool, render) -> None:
    """--json: one object on stdout; otherwise the stage's rich rendering on stderr."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        render(result)


def render_prepare(out: dict[str, Any]) -> None:
    r = out["result"]
    if out["skipped"]:
        err.print(f"prepare is up to date (run {out['run_id']}); use --force to redo it", soft_wrap=True)
    table = Table(title=f"prepare: {r['source']}", title_justify="left")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key in ("users", "items", "interactions"):
        table.add_row(key, f"{r[key]:,}")
    table.add_row("sparsity", f"{r['sparsity']:.4%}")
    table.add_row("sequence length avg / median", f"{r['avg_sequence_length']:.2f} / {r['median_sequence_length']:g}")
    table.add_row("sequence length min / max", f"{r['min_sequence_length']} / {r['max_sequence_length']}")
    s = r["samples"]
    table.add_row(f"samples train / valid / test (history <= {r['max_history']})",
                  f"{s['train']:,} / {s['valid']:,} / {s['test']:,}")
    table.add_row("item text fields", ", ".join(r["text_fields"]) or "none")
    table.add_row("items without text", f"{r['items_without_text']:,}")
    for step in r["steps"]:
        table.add_row(f"removed: {step['step']}", f"{step['removed']:,}")
    err.print(table)
    for note in r.get("notes", []):
        err.print(f"note: {escape(note)}")


def _skipped(out: dict[str, Any]) -> None:
    if out["skipped"]:
        err.print(f"{out['stage']} is up to date (run {out['run_id']}); use --force to redo it", soft_wrap=True)


def _scalar_table(title: str, result: dict[str, Any]) -> Table:
    """Every scalar entry of a result as a row (lists and dicts are rendered elsewhere or only in --json)."""
    table = Table(title=title, title_justify="left")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, (dict, list)) or value is None:
            continue
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else (
            f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row(key.replace("_", " "), escape(text))
    return table


def render_generic(out: dict[str, Any]) -> None:
    _skipped(out)
    err.print(_scalar_table(out["stage"], out["result"]))
    for note in out["result"].get("notes", []) or []:
        err.print(f"note: {escape(note)}")


def render_tokenize(out: dict[str, Any]) -> None:
    render_generic(out)
    rows = out["result"].get("level_stats") or []
    if rows:
        table = Table(title="codebook statistics (before disambiguation)", title_justify="left")
        for col in rows[0]:
            table.add_column(col.replace("_", " "), justify="right")
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
        err.print(table)


def render_evaluate(out: dict[str, Any]) -> None:
    """The run's facts, then one row per cut-off K: the model's Recall/NDCG beside popularity's."""
    render_generic(out)
    r = out["result"]
    table = Table(title=f"{r['split']} metrics ({r['users']:,} users, {r['items']:,} items, item-level, "
                        f"{r['decode']} decoding)", title_justify="left")
    best = r.get("baseline")  # the best `bloger baseline` run of the workspace, when there is one
    for col in ("K", "recall", "ndcg", "popularity recall", "popularity ndcg",
                *((f"{best['model']} recall", f"{best['model']} ndcg") if best else ())):
        table.add_column(col, justify="right")
    ks = [name.split("@")[1] for name in r["metrics"] if name.startswith("recall@")]
    for k in ks:
        extra = [f"{best['metrics'][f'{m}@{k}']:.4f}" if f"{m}@{k}" in best["metrics"] else "—"
                 for m in ("recall", "ndcg")] if best else []
        table.add_row(k, *(f"{values[f'{m}@{k}']:.4f}" for values in (r["metrics"], r["popularity"])
                           for m in ("recall", "ndcg")), *extra)
    err.print(table)


def render_baseline(out: dict[str, Any]) -> None:
    """The run's facts, then one row per cut-off K."""
    render_generic(out)
    r = out["result"]
    table = Table(title=f"{r['model']}: test metrics ({r['users']:,} users, {r['items']:,} items, item-level, "
                        "full ranking)", title_justify="left")
    for col in ("K", "recall", "ndcg"):
        table.add_column(col, justify="right")
    for name, value in r["metrics"].items():
        if name.startswith("recall@"):
            k = name.split("@")[1]
            table.add_row(k, f"{value:.4f}", f"{r['metrics'][f'ndcg@{k}']:.4f}")
    err.print(table)


def render_report(r: dict[str, Any]) -> None:
    """`bloger report`: its notes (plots skipped, K left out), then where the page is."""
    for note in r["notes"]:
        err.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    err.print(f"report: {r['report']} ({len(r['runs'])} runs, {len(r['figures'])} figures)", highlight=False,
              soft_wrap=True)


def render_runs(result: dict[str, Any]) -> None:
    """`bloger runs`: one row per run (a workspace column when there are several)."""
    several = len(result["workspaces"]) > 1
    table = Table(title=f"{len(result['runs'])} runs", title_justify="left", box=box.SIMPLE_HEAD)
    named = any(r.get("run") for r in result["runs"])
    columns = (["workspace"] if several else []) + (["run"] if named else []) + [
        "started", "stage", "status", "mode", "seed", "config", "recall@10", "ndcg@10", "churn", "seconds", "id"]
    for col in columns:
        table.add_column(col, justify="right" if col in ("seed", "recall@10", "ndcg@10", "churn", "seconds")
                         else "left")
    colour = {"done": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "killed": "red"}
    for r in result["runs"]:
        cells = [escape(c) for c in ([r["workspace"]] if several else []) + ([r.get("run") or ""] if named else []) + [
            (r["started_at"] or "")[5:16], r["stage"], r["status"], r["mode"] or "",
            "" if r["seed"] is None else str(r["seed"]), (r["config_hash"] or "")[:8],
            *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in ("recall@10", "ndcg@10")),
            "" if r.get("churn") is None else f"{r['churn']:.3f}",  # bilevel: mean share re-coded per update
            "" if r["seconds"] is None else f"{r['seconds']:.0f}", r["run_id"].rsplit("-", 1)[-1]]]
        status_at = 2 + several + named
        cells[status_at] = f"[{colour.get(r['status'], 'white')}]{cells[status_at]}[/]"
        table.add_row(*cells)
    (err if err.is_terminal else Console(stderr=True, width=120)).print(table)  # a log is not 80 wide
    if result["runs"]:
        err.print("id: the run id's last part; --json gives whole ids, full metrics and errors",
                  style="dim", highlight=False)


RENDERERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "prepare": render_prepare, "embed": render_generic, "tokenize": render_tokenize,
    "train-bilevel": render_generic, "evaluate": render_evaluate, "export-ids": render_generic,
    "baseline": render_baseline,
}
