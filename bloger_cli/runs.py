"""`bloger runs`: the stage runs recorded in one or several workspaces' catalogs, as rows.

A row per run: workspace, run id, stage, status, mode and seed (training and evaluation runs), config
hash, the headline metrics (validation metrics of a training run, test metrics of an evaluation),
start time and duration. Read-only: the catalogs are opened for reading, so it runs beside a training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bloger_cli.errors import ConfigError, WorkspaceError
from bloger_cli.workspace import Workspace, is_busy

METRICS = {"train-bilevel": {"recall@10": "val_recall@10", "ndcg@10": "val_ndcg@10"}}  # result key per column


def _metrics(stage: str, result: dict[str, Any]) -> dict[str, float]:
    if stage in ("evaluate", "baseline"):  # test metrics
        return dict(result.get("metrics") or {})
    keys = METRICS.get(stage, {})
    return {name: result[key] for name, key in keys.items() if result.get(key) is not None}


RUN_STATUSES = ("done", "failed", "interrupted", "running", "killed")


def list_runs(workspaces: list[Path], *, stage: str | None = None, mode: str | None = None,
              status: str | None = None) -> list[dict[str, Any]]:
    """Every run of these workspaces, newest first, filtered by stage, mode and status. A run the
    catalog still calls running while no process holds the workspace lock was killed (or crashed): its
    status reads "killed"."""
    if status is not None and status not in RUN_STATUSES:
        raise ConfigError(f"--status {status}: not a run status", hint=f"give one of {', '.join(RUN_STATUSES)}")
    rows = []
    for root in workspaces:
        ws = Workspace(root)
        if not ws.catalog.path.exists():
            raise WorkspaceError(f"{root} is not a bloger workspace (no catalog.duckdb)",
                                 hint="pass a directory that `bloger prepare` made")
        recorded = ws.catalog.runs(stage, None if status in ("running", "killed") else status)
        busy = any(run.status == "running" for run in recorded) and is_busy(ws)
        for run in recorded:
            run_status = "killed" if run.status == "running" and not busy else run.status
            if status is not None and run_status != status:
                continue
            run_mode = run.config.get("mode") or run.result.get("mode")
            if mode is not None and run_mode != mode:
                continue
            seconds = ((run.finished_at - run.started_at).total_seconds()
                       if run.finished_at and run.started_at else None)
            rows.append({
                "workspace": str(root), "run": run.run_name, "run_id": run.run_id, "stage": run.stage,
                "status": run_status,
                "mode": run_mode, "seed": run.config.get("seed", run.result.get("seed")),
                "config_hash": run.config_hash, "metrics": _metrics(run.stage, run.result),
                "started_at": run.started_at.isoformat(sep=" ", timespec="seconds") if run.started_at else None,
                "seconds": round(seconds, 1) if seconds is not None else None, "error": run.error,
                "churn": run.result.get("mean_churn"),  # bilevel: mean share of items re-coded per update
            })
    rows.sort(key=lambda r: str(r["started_at"] or ""), reverse=True)
    return rows
