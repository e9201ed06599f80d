"""`bloger runs`: the recorded runs of one or several workspaces, filtered, as a table or JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bloger_cli.errors import WorkspaceError
from bloger_cli.runs import list_runs


def test_a_trained_workspace_lists_every_stage_run_newest_first(trained_workspace: Path) -> None:
    rows = list_runs([trained_workspace])
    assert [r["stage"] for r in rows][::-1][:4] == ["prepare", "embed", "tokenize", "train-bilevel"]
    train = next(r for r in rows if r["stage"] == "train-bilevel")
    assert (train["status"], train["mode"], train["seed"]) == ("done", "fixed", 42)
    assert len(train["config_hash"]) == 16 and train["seconds"] >= 0 and train["error"] is None
    assert set(train["metrics"]) == {"recall@10", "ndcg@10"} and 0 <= train["metrics"]["recall@10"] <= 1
    assert [r["started_at"] for r in rows] == sorted((r["started_at"] for r in rows), reverse=True)


def test_filters_and_several_workspaces(trained_workspace: Path, tmp_path: Path, cli) -> None:
    other = tmp_path / "other"
    shutil.copytree(trained_workspace, other)
    assert cli("evaluate", "-w", other).exit_code == 0
    result = cli("runs", "-w", trained_workspace, "-w", other, "--mode", "fixed", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["runs"]
    assert {(Path(r["workspace"]).name, r["stage"]) for r in rows} == {
        ("trained", "train-bilevel"), ("other", "train-bilevel"), ("other", "evaluate")}
    evaluation = next(r for r in rows if r["stage"] == "evaluate")
    assert evaluation["seed"] == 42 and "recall@20" in evaluation["metrics"]  # test metrics, every K
    assert list_runs([trained_workspace], status="failed") == []
    assert {r["stage"] for r in list_runs([other], stage="evaluate")} == {"evaluate"}


def test_a_failed_run_shows_its_error(trained_workspace: Path, cli, monkeypatch) -> None:
    from bloger_cli.errors import DataError
    from bloger_cli.stages import train as stage

    def fail(*args, **kwargs):
        raise DataError("the disk is full")

    monkeypatch.setattr(stage, "fit", fail)
    assert cli("train-bilevel", "-w", trained_workspace, "--mode", "fixed", "--force", "--set", "device=cpu").exit_code != 0
    table = cli("runs", "-w", trained_workspace, "--status", "failed")
    assert table.exit_code == 0 and "train-bilevel" in table.stderr and "failed" in table.stderr
    [row] = list_runs([trained_workspace], status="failed")
    assert row["error"] == "the disk is full" and row["mode"] == "fixed"


def test_a_directory_that_is_no_workspace_is_one_clear_error(tmp_path: Path, cli) -> None:
    with pytest.raises(WorkspaceError, match="is not a bloger workspace"):
        list_runs([tmp_path])
    result = cli("runs", "-w", tmp_path)
    assert result.exit_code != 0 and "is not a bloger workspace" in result.stderr and "Traceback" not in result.output


def test_a_run_left_running_with_no_process_reads_killed(trained_workspace: Path) -> None:
    from filelock import FileLock

    from bloger_cli.workspace import Workspace

    ws = Workspace(trained_workspace)
    ws.catalog.start_run("train-bilevel", {"mode": "fixed", "seed": 7}, "h" * 16, "f", {})  # as a SIGKILL leaves it
    assert [r["status"] for r in list_runs([trained_workspace], status="killed")] == ["killed"]
    with FileLock(str(trained_workspace / ".bloger.lock")):  # a live process holds the workspace
        assert [r["seed"] for r in list_runs([trained_workspace], status="running")] == [7]
        assert list_runs([trained_workspace], status="killed") == []
