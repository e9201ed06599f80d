"""The report's figures, drawn with matplotlib (the optional `plot` extra) into PNG bytes.

No pyplot: each figure is a `matplotlib.figure.Figure` rendered by the Agg canvas, so nothing global
(backend, interactive state) is touched and the bytes are the same for the same data (no timestamp in
the PNG metadata), which lets a re-run leave unchanged files alone.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from bloger_cli.errors import BlogerError
from bloger_cli.report.collect import ReportRun

TOKENIZER_PANELS = (("collision_rate", "collision rate"), ("level1_density", "level-1 density"),
                    ("level1_entropy", "level-1 entropy (bits)"), ("churn", "churn (share of items re-coded)"),
                    ("conflict_fraction", "gradient conflict (share of tensors)"))


class MissingPlotExtra(BlogerError):
    """matplotlib is not installed (exit 1)."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingPlotExtra("bloger report needs matplotlib, which is not installed",
                               hint="pip install 'bloger[plot]' (or: pip install 'matplotlib>=3.7')") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def require_matplotlib() -> None:
    """Fail before any work when the plot extra is missing."""
    _figure(1, 1)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _epochs(run: ReportRun) -> dict[str, np.ndarray] | None:
    if run.history is None:
        return None
    table = run.history
    if "event" in table.column_names:
        keep = np.array([e in ("epoch", "eval") for e in table.column("event").to_pylist()])  # eval: mid-epoch
    else:
        keep = np.ones(table.num_rows, dtype=bool)
    return {name: np.array(table.column(name).to_pylist(), dtype=object)[keep] for name in table.column_names}


def training_figure(runs: list[ReportRun], notes: list[str]) -> bytes | None:
    """Training loss and validation NDCG@10 against steps and against time (cumulative epoch seconds)."""
    panels = [("train_loss", "step", "training loss", "step"), ("train_loss", "seconds", "training loss", "time (s)"),
              ("val_ndcg_10", "step", "validation NDCG@10", "step"),
              ("val_ndcg_10", "seconds", "validation NDCG@10", "time (s)")]
    curves = [(run, _epochs(run)) for run in runs if run.mode != "popularity"]  # popularity does not train
    for run, rows in curves:
        if rows is None:
            notes.append(f"{run.label}: no history to plot (no history file in {run.workspace})")
            continue
        for column in ("step", "seconds", "train_loss", "val_ndcg_10"):
            if column not in rows:
                notes.append(f"{run.label}: its history has no {column} column (an older format); the "
                             f"plots that need it are skipped for this run")
    if not any(rows is not None for _, rows in curves):
        return None
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2)
    for ax, (y, x, ylabel, xlabel) in zip(axes.flat, panels):
        for run, rows in curves:
            if rows is None or y not in rows or x not in rows:
                continue
            if x == "seconds" and "elapsed" in rows:  # wall time since the run began (this version's rows)
                xs = np.array([np.nan if v is None else v for v in rows["elapsed"]], dtype=float)
            elif x == "seconds":  # older histories: epochs' seconds added up
                xs = np.cumsum(np.nan_to_num(np.array([np.nan if v is None else v for v in rows[x]], dtype=float)))
            else:
                xs = np.array([np.nan if v is None else v for v in rows[x]], dtype=float)
            ys = np.array([np.nan if v is None else v for v in rows[y]], dtype=float)
            shown = np.isfinite(xs) & np.isfinite(ys)  # eval rows have no loss, epochs without validation no metric
            ax.plot(xs[shown], ys[shown], marker="o", markersize=3, label=run.label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize="small")
    return _png(fig)


def tokenizer_figure(runs: list[ReportRun], notes: list[str]) -> bytes | None:
    """Per tokenizer update of the bilevel runs: collisions, level-1 density and entropy, churn, conflicts."""
    updates = []
    for run in runs:
        table = run.history
        if table is None or "event" not in table.column_names:
            continue
        keep = np.array([e == "tokenizer_update" for e in table.column("event").to_pylist()])
        if keep.any():
            updates.append((run, {name: np.array(table.column(name).to_pylist(), dtype=object)[keep]
                                  for name in table.column_names}))
    if not updates:
        return None
    fig = _figure(11, 6.5)
    axes = fig.subplots(2, 3)
    for ax, (key, title) in zip(axes.flat, TOKENIZER_PANELS):
        for run, rows in updates:
            columns = sorted(c for c in rows if c == "ids_changed" or c.startswith("churn")) if key == "churn" \
                else [key] if key in rows else []
            if not columns:
                notes.append(f"{run.label}: its tokenizer updates have no {key} column (an older format); "
                             f"the {title} plot is skipped for this run")
                continue
            for column in columns:
                ys = np.array([np.nan if v is None else v for v in rows[column]], dtype=float)
                name = run.label if len(columns) == 1 else f"{run.label}: {column}"
                ax.plot(rows["step"].astype(float), ys, marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="x-small")
    axes.flat[-1].set_axis_off()
    return _png(fig)


def codebook_figure(runs: list[ReportRun], notes: list[str]) -> bytes | None:
    """Per level: items per code, codes sorted from most to least used, one step line per run."""
    coded = [r for r in runs if r.codes is not None]
    if not coded:
        return None
    levels = max(r.codes.shape[1] for r in coded)
    fig = _figure(min(4.0 * levels, 16), 3.6)
    axes = np.atleast_1d(fig.subplots(1, levels))
    for level, ax in enumerate(axes):
        for run in coded:
            if level >= run.codes.shape[1]:
                continue
            counts = np.sort(np.bincount(run.codes[:, level], minlength=run.codebook_size))[::-1]
            used = int((counts > 0).sum())
            ax.step(np.arange(1, len(counts) + 1), counts, where="mid",
                    label=f"{run.label}: {used}/{len(counts)} used")
        ax.set_title(f"level {level + 1}", fontsize="medium")
        ax.set_xlabel("code (by usage)")
        ax.set_ylabel("items")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _png(fig)


# file name -> (heading, a sentence under it, the function that draws it)
FIGURES: dict[str, tuple[str, str, Callable[[list[ReportRun], list[str]], bytes | None]]] = {
    "training.png": ("Training loss and validation NDCG@10", "Against steps and against time (the epochs' "
                     "seconds, summed). SASRec's loss is a cross-entropy over items, the generative runs' over "
                     "code tokens: compare shapes, not levels.", training_figure),
    "tokenizer.png": ("Tokenizer updates", "One point per tokenizer update of each bilevel run.", tokenizer_figure),
    "codebook.png": ("Codebook usage per level", "Items per code, codes sorted by usage, for the semantic IDs "
                     "each run decodes with (tokenize's for mode fixed).", codebook_figure),
}
