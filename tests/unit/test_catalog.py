"""The DuckDB catalog: run records, current artifacts, read-only use and a busy database file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bloger_cli.artifacts import ArtifactInfo
from bloger_cli.catalog import Catalog
from bloger_cli.errors import WorkspaceBusy, WorkspaceError


def info(kind: str, name: str, rows: int, content: str) -> ArtifactInfo:
    return ArtifactInfo(kind=kind, path=Path("/anywhere") / name, rows=rows, config_hash="cfg",
                        parents={"p": "1"}, content_hash=content)


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    return Catalog(tmp_path / "catalog.duckdb")


def test_empty_catalog_reads_as_nothing(catalog):
    assert catalog.current_artifacts() == {} and catalog.runs() == [] and catalog.last_done("prepare") is None
    assert not catalog.path.exists()  # reading does not create it


def test_read_only_connection_needs_the_file(catalog):
    with pytest.raises(WorkspaceError) as exc:
        with catalog.connect(read_only=True):
            pass
    assert str(exc.value) == (f"{catalog.path.parent} is not a bloger workspace (no catalog.duckdb); "
                              "run `bloger prepare` there first")


def test_run_lifecycle(catalog):
    run_id = catalog.start_run("prepare", {"max_history": 20}, "cfg", "fp", {"file:/x": "3:4"})
    assert re.fullmatch(r"prepare-\d{8}-\d{6}-[0-9a-f]{6}", run_id)
    [run] = catalog.runs()
    assert (run.status, run.config, run.config_hash, run.fingerprint, run.inputs) == (
        "running", {"max_history": 20}, "cfg", "fp", {"file:/x": "3:4"})
    assert run.started_at is not None and run.finished_at is None and run.result == {} and run.error is None
    assert catalog.last_done("prepare") is None

    catalog.finish_run(run_id, "done", {"users": 3}, artifacts=[info("users", "users.parquet", 3, "h1")])
    [run] = catalog.runs()
    assert (run.status, run.result) == ("done", {"users": 3}) and run.finished_at >= run.started_at
    assert catalog.last_done("prepare").run_id == run_id
    current = catalog.current_artifacts()
    assert list(current) == ["users"]
    row = current["users"]
    assert (row["path"], row["rows"], row["content_hash"], row["config_hash"], row["run_id"], row["current"]) == (
        "users.parquet", 3, "h1", "cfg", run_id, True)  # the path is stored relative to the workspace


def test_a_new_artifact_replaces_the_current_one_of_its_kind(catalog):
    first = catalog.start_run("prepare", {}, "a", "f1", {})
    catalog.finish_run(first, "done", {}, artifacts=[info("users", "users.parquet", 3, "h1"),
                                                     info("items", "items.parquet", 5, "i1")])
    second = catalog.start_run("prepare", {}, "b", "f2", {})
    catalog.finish_run(second, "done", {}, artifacts=[info("users", "users.parquet", 4, "h2")])
    current = catalog.current_artifacts()
    assert {k: (v["run_id"], v["content_hash"]) for k, v in current.items()} == {
        "items": (first, "i1"), "users": (second, "h2")}
    with catalog.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM artifacts WHERE kind = 'users'").fetchone()[0] == 2


def test_failed_runs_register_nothing_and_filters(catalog):
    ok = catalog.start_run("prepare", {}, "a", "f", {})
    catalog.finish_run(ok, "done", {}, artifacts=[info("users", "users.parquet", 3, "h1")])
    bad = catalog.start_run("prepare", {}, "a", "f", {})
    catalog.finish_run(bad, "failed", error="x.json: no interactions found",
                       artifacts=[])
    other = catalog.start_run("embed", {}, "e", "g", {})
    assert [r.run_id for r in catalog.runs()] == [other, bad, ok]  # newest first
    assert [r.run_id for r in catalog.runs("prepare")] == [bad, ok]
    assert [r.run_id for r in catalog.runs(status="failed")] == [bad]
    assert catalog.runs("prepare", "failed")[0].error == "x.json: no interactions found"
    assert catalog.last_done("prepare").run_id == ok and catalog.last_done("embed") is None
    assert catalog.current_artifacts()["users"]["run_id"] == ok


def test_busy_database_file_gives_workspace_busy(tmp_path):
    """Another process holding the catalog open for writing: retry until busy_timeout, then fail."""
    path = tmp_path / "catalog.duckdb"
    Catalog(path).start_run("prepare", {}, "a", "f", {})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, duckdb; con = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(WorkspaceBusy) as exc:
            Catalog(path, busy_timeout=0.3).start_run("prepare", {}, "a", "f", {})
        assert str(exc.value).startswith(f"cannot open {path}: ")
        assert exc.value.exit_code == 3
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert len(Catalog(path).runs()) == 1  # usable again once the other process is gone
