"""`bloger status`: each stage of a workspace as done, stale or missing, what a killed process left
behind (an unfinished commit, runs still marked running, temporary files of dead writers), and the
repair of those leftovers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bloger_cli import journal
from bloger_cli.artifacts import RUN_STAGES, SPECS, ArtifactSpec, file_hash
from bloger_cli.catalog import RunRecord
from bloger_cli.workspace import Workspace, is_busy, raw_fingerprint, roll_forward


def stage_outputs() -> dict[str, list[ArtifactSpec]]:
    """stage -> the artifact specs it writes, in the order stages run."""
    out: dict[str, list[ArtifactSpec]] = {}
    for spec in SPECS.values():
        out.setdefault(spec.producer, []).append(spec)
    return out


def stage_status(ws: Workspace) -> list[dict[str, Any]]:
    """Each stage as done / stale / missing, with the reason and its last successful run."""
    current = ws.catalog.current_artifacts(ws.run)
    rows: list[dict[str, Any]] = []
    stale_kinds: set[str] = set()
    for stage, specs in stage_outputs().items():
        last = ws.catalog.last_done(stage, ws.run if stage in RUN_STAGES else None)
        row = {"stage": stage, "state": "missing", "reason": f"run `bloger {stage}`", "run_id": None,
               "finished_at": None}
        if last is not None:
            row.update(run_id=last.run_id, finished_at=str(last.finished_at))
            reason = _staleness(ws, last, current, stale_kinds)
            row.update(state="stale" if reason else "done", reason=reason or "up to date")
            if reason:
                stale_kinds.update(s.kind for s in specs)
        rows.append(row)
    return rows


def _staleness(ws: Workspace, run: RunRecord, current: dict[str, dict[str, Any]], stale: set[str]) -> str:
    for key, fp in run.inputs.items():
        kind_or_path = key.split(":", 1)[1]
        if key.startswith("file:"):
            path = Path(kind_or_path)
            if not path.exists():
                return f"input {path} is gone"
            if raw_fingerprint(path) != fp:
                return f"input {path} changed"
        elif kind_or_path in stale:
            return f"upstream {kind_or_path} is stale"
        elif current.get(kind_or_path, {}).get("content_hash") != fp:
            return f"upstream {kind_or_path} changed since this run"
    for row in current.values():
        if row["run_id"] == run.run_id:
            path = ws.root / row["path"]
            if not path.is_file():
                return f"{path} is missing"
            if file_hash(path) != row["content_hash"]:
                return f"{path} was modified outside bloger"
    return ""


def problems(ws: Workspace) -> list[str]:
    """What a killed process left behind: an unfinished commit, runs still marked running while nobody
    holds the workspace, temporary files of dead writers. (`repair` fixes them.)"""
    found = []
    commit = journal.read(ws.root)
    if commit is not None:
        missing = sum(not (ws.root / tmp).is_file() for tmp, _ in commit.moves)
        found.append(f"{commit.stage} run {commit.run_id} stopped while switching in its outputs "
                     f"({missing} of {len(commit.moves)} in place)")
    if not is_busy(ws):
        found += [f"{run.stage} run {run.run_id} is marked running, but no process holds the workspace (killed?)"
                  for run in ws.catalog.runs(status="running")]
    keep = {ws.root / tmp for tmp, _ in commit.moves} if commit else set()
    found += [f"temporary file {path} of a writer that is gone" for path in journal.stray_temps(ws.root, keep)]
    return found


def repair(ws: Workspace, lock_timeout: float = 60.0) -> list[str]:
    """Fix what `problems` finds: roll a decided commit forward, mark dead runs killed, remove dead
    writers' temporary files. Returns what was done."""
    done = []
    with ws.lock(lock_timeout):
        rolled = roll_forward(ws)
        if rolled:
            done.append(rolled)
        for run in ws.catalog.runs(status="running"):
            ws.catalog.finish_run(run.run_id, "killed", error="the process ended without finishing (killed?)")
            done.append(f"marked {run.stage} run {run.run_id} killed")
        for path in journal.stray_temps(ws.root):
            path.unlink(missing_ok=True)
            done.append(f"removed {path}")
    return done
