"""What a report shows, gathered from the workspaces' catalogs and artifacts (read-only, no plotting).

A report run is a workspace's latest finished `train-bilevel` run (with its latest test `evaluate` after
it and its history.parquet), or its latest finished `baseline` run of each model (SASRec's curves from
baseline_history.parquet). Runs that share a mode are seeds of one setting: the summary gives their mean
and a 95% interval (Student's t).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bloger_cli.catalog import RunRecord
from bloger_cli.errors import DataError, WorkspaceError
from bloger_cli.workspace import Workspace

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class ReportRun:
    """One trained model of one workspace, with what the report draws and tabulates of it."""

    label: str
    workspace: Path
    stage: str  # "train-bilevel" or "baseline"
    mode: str  # fixed / joint / bilevel, or the baseline model
    seed: int | None
    run_id: str
    config: dict[str, Any]
    result: dict[str, Any]
    test: dict[str, float] | None  # "recall@10" -> value; None: never evaluated on the test users
    history: pa.Table | None
    codes: np.ndarray | None = None  # (N, L) the run's semantic IDs, the disambiguation level left out
    codebook_size: int | None = None
    notes: list[str] = field(default_factory=list)


def interval95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval of the mean); the half-width is nan for a single value."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def collect_runs(roots: list[Path]) -> list[ReportRun]:
    """Every reportable run of these workspaces, in the order given; an error for a workspace with none."""
    runs: list[ReportRun] = []
    for root in roots:
        ws = Workspace(root)
        if not ws.catalog.path.exists():
            raise WorkspaceError(f"{root} is not a bloger workspace (no catalog.duckdb)",
                                 hint="pass a directory that `bloger prepare` made")
        found = _workspace_runs(ws)
        if not found:
            raise DataError(f"{root} has no finished training or baseline run to report",
                            hint=f"run `bloger train-bilevel -w {root}` (then `bloger evaluate`) or "
                            f"`bloger baseline -w {root}` first")
        runs.extend(found)
    seen: dict[str, int] = {}
    for run in runs:  # two workspaces of the same name: tell them apart by the full path
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.workspace}" + run.label[len(run.workspace.name):]
    return runs


def _workspace_runs(ws: Workspace) -> list[ReportRun]:
    records = ws.catalog.runs(status="done")  # newest first
    # each named run (and the unnamed one) of the workspace, in the order they were trained
    names = ws.catalog.run_names("train-bilevel")[::-1]
    baselines: dict[tuple[str, str | None], RunRecord] = {}  # the latest of each model in each run
    for r in reversed(records):  # oldest first: the report lists runs in the order they were made
        if r.stage == "baseline":
            baselines[(r.config.get("model", "sasrec"), r.run_name)] = r
    several = len(names) + len(baselines) > 1
    out = []
    for run_name in names:
        train = next(r for r in records if r.stage == "train-bilevel" and r.run_name == run_name)
        wsr = ws.with_run(run_name)
        mode = str(train.config.get("mode") or train.result.get("mode"))
        surgery = train.config.get("bilevel", {}).get("surgery", "pcgrad")
        if mode == "bilevel" and surgery != "pcgrad":  # the pipelines' bilevel-none: another setting
            mode = f"bilevel-{surgery}"
        name = run_name or (f"{ws.root.name} ({mode})" if several else ws.root.name)
        run = ReportRun(name, ws.root, "train-bilevel",
                        mode, train.config.get("seed"), train.run_id, train.config, train.result, None,
                        _history(wsr, "history"))
        run.test = _test_metrics([r for r in records if r.run_name == run_name], train, run)
        _codes(wsr, run)
        out.append(run)
    for (model, _), record in baselines.items():
        wsb = ws.with_run(record.run_name)
        history = _history(wsb, "baseline_history") if model == "sasrec" else None
        name = record.run_name or (f"{ws.root.name} ({model})" if several else ws.root.name)
        out.append(ReportRun(name, ws.root, "baseline", model,
                             record.config.get("seed"), record.run_id, record.config, record.result,
                             dict(record.result.get("metrics") or {}), history))
    return out


def _test_metrics(records: list[RunRecord], train: RunRecord, run: ReportRun) -> dict[str, float] | None:
    """The newest test evaluation that started after the training finished."""
    for r in records:
        if r.stage == "evaluate" and r.result.get("split") == "test" and r.started_at and train.finished_at \
                and r.started_at >= train.finished_at:
            return dict(r.result.get("metrics") or {})
    named = f" --run {train.run_name}" if train.run_name else ""
    run.notes.append(f"{run.label}: no test evaluation after its training; run `bloger evaluate -w "
                     f"{run.workspace}{named}` (left out of the metrics table)")
    return None


def _history(ws: Workspace, kind: str) -> pa.Table | None:
    """The history as written, any format (the plots check the columns they need)."""
    path = ws.path(kind)
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError):
        return None


def _codes(ws: Workspace, run: ReportRun) -> None:
    """The semantic IDs the run's model decodes with (tokenize's where training wrote none)."""
    path = next((p for p in (ws.path("trained_semantic_ids"), ws.path("semantic_ids")) if p.is_file()), None)
    if path is None:
        return
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    info = json.loads(meta.get(b"bloger.meta", b"{}"))
    column = table.column("codes").combine_chunks()
    codes = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    levels = int(info.get("levels", codes.shape[1]))
    run.codes, run.codebook_size = codes[:, :levels].astype(np.int64), int(info.get("codebook_size", codes.max() + 1))


def tokenize_before(roots: list[Path]) -> dict[str, float] | None:
    """Level-1 density and entropy and the collision rate of the first workspace's tokenize run."""
    for root in roots:
        tokenize = Workspace(root).catalog.last_done("tokenize")
        if tokenize is not None and tokenize.result.get("level_stats"):
            first = tokenize.result["level_stats"][0]
            return {"level1_density": first["density"], "level1_entropy": first["entropy_bits"],
                    "collision_rate": tokenize.result["collision_rate"]}
    return None


def shared_ks(runs: list[ReportRun]) -> tuple[list[int], list[str]]:
    """The cut-offs every evaluated run has, and notes on those left out; an error when there is none."""
    tested = {r.label: r.test for r in runs if r.test}
    if not tested:
        return [], []
    ks_of = {label: sorted({int(name.split("@")[1]) for name in test}) for label, test in tested.items()}
    common = sorted(set.intersection(*(set(ks) for ks in ks_of.values())))
    if not common:
        listing = "; ".join(f"{label} has K = {', '.join(map(str, ks))}" for label, ks in ks_of.items())
        raise DataError(f"the runs share no cut-off K ({listing})",
                        hint="re-run `bloger evaluate --k` or `bloger baseline --k` with a common list")
    dropped = sorted(set().union(*(set(ks) for ks in ks_of.values())) - set(common))
    notes = [f"K = {', '.join(map(str, dropped))} left out of the metrics table: not every run has them"] \
        if dropped else []
    return common, notes


def summarize_modes(runs: list[ReportRun], ks: list[int]) -> list[dict[str, Any]]:
    """Per mode (seeds pooled): runs, and mean and 95% half-width of each test metric."""
    out = []
    for mode in dict.fromkeys(r.mode for r in runs if r.test):
        group = [r for r in runs if r.mode == mode and r.test]
        tests = [r.test for r in group if r.test]  # all of them: the test narrows the type
        row: dict[str, Any] = {"mode": mode, "stage": group[0].stage, "runs": len(group),
                               "seeds": sorted({r.seed for r in group if r.seed is not None})}
        for k in ks:
            for metric in ("recall", "ndcg"):
                row[f"{metric}@{k}"] = interval95([test[f"{metric}@{k}"] for test in tests])
        out.append(row)
    return out


def config_differences(runs: list[ReportRun]) -> dict[str, list[tuple[str, list[str]]]]:
    """stage -> [(dotted key, value per run)] for the keys whose values differ between that stage's runs."""
    out = {}
    for stage in ("train-bilevel", "baseline"):
        group = [r for r in runs if r.stage == stage]
        if len(group) < 2:
            continue
        flat = [_flatten(r.config) for r in group]
        keys = sorted(set().union(*flat))
        rows = [(key, [str(f.get(key, "—")) for f in flat]) for key in keys
                if len({str(f.get(key, "—")) for f in flat}) > 1]
        if rows:
            out[stage] = rows
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
