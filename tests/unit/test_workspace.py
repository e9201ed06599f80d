"""The stage runner: no-op when unchanged, --force, atomic commit, failure cleanup, the lock, staleness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest
from filelock import FileLock

from bloger_cli.artifacts import SPECS, file_hash, make_metadata, write_arrow
from bloger_cli.config import PrepareConfig
from bloger_cli.errors import ArtifactError, DataError, WorkspaceBusy, WorkspaceError
from bloger_cli.status import stage_status
from bloger_cli.workspace import Workspace, raw_fingerprint, run_stage

CFG = PrepareConfig(input=Path("raw.json"))


def users_table(n: int) -> pa.Table:
    return pa.table({"user_id": pa.array(range(n), pa.int32()),
                     "user_key": pa.array([f"u{i}" for i in range(n)], pa.string()),
                     "n_interactions": pa.array([3] * n, pa.int32())})


def interactions_table(n: int) -> pa.Table:
    return pa.table({"user_id": pa.array([0] * n, pa.int32()), "item_id": pa.array(range(n), pa.int32()),
                     "ts": pa.array(range(n), pa.int64())})


class Body:
    """A stage body writing users + interactions of `n` rows; counts its calls; can fail midway."""

    def __init__(self, n: int = 3, fail: BaseException | None = None) -> None:
        self.n, self.fail, self.calls = n, fail, 0

    def __call__(self, ctx):
        self.calls += 1
        write_arrow(users_table(self.n), ctx.output("users"), ctx.metadata("users"))
        write_arrow(interactions_table(self.n), ctx.output("interactions"), ctx.metadata("interactions"))
        if self.fail is not None:
            raise self.fail
        return {"rows": self.n}


@pytest.fixture
def raw(tmp_path) -> Path:
    path = tmp_path / "raw.json"
    path.write_text('{"u": [1, 2, 3]}')
    return path


def inputs_for(raw: Path) -> dict[str, str]:
    return {f"file:{raw.resolve()}": raw_fingerprint(raw)}


def snapshot(ws: Workspace) -> dict[str, bytes]:
    """Every parquet file's bytes (what a failed run must leave untouched)."""
    return {p.name: p.read_bytes() for p in sorted(ws.root.glob("*.parquet"))}


def leftovers(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.root.glob(".*.tmp-*"))


def test_first_run_commits_outputs_and_records_them(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    out = run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    assert not out.skipped and out.result == {"rows": 3} and out.run_id.startswith("prepare-")
    assert sorted(snapshot(ws)) == ["interactions.parquet", "users.parquet"] and leftovers(ws) == []
    current = ws.catalog.current_artifacts()
    assert sorted(current) == ["interactions", "users"]
    assert current["users"]["content_hash"] == file_hash(ws.path("users"))
    assert current["users"]["rows"] == 3 and current["users"]["run_id"] == out.run_id
    [run] = ws.catalog.runs()
    assert (run.run_id, run.stage, run.status, run.result, run.inputs) == (
        out.run_id, "prepare", "done", {"rows": 3}, inputs_for(raw))
    assert ws.info("users").config_hash == run.config_hash


def test_unchanged_inputs_are_a_no_op_and_force_reruns(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    body = Body(3)
    first = run_stage(ws, "prepare", CFG, inputs_for(raw), body)
    before = snapshot(ws)
    again = run_stage(ws, "prepare", CFG, inputs_for(raw), body)
    assert again.skipped and again.run_id == first.run_id and again.result == {"rows": 3}
    assert body.calls == 1 and snapshot(ws) == before
    forced = run_stage(ws, "prepare", CFG, inputs_for(raw), body, force=True)
    assert not forced.skipped and forced.run_id != first.run_id and body.calls == 2
    assert [r.status for r in ws.catalog.runs()] == ["done", "done"]
    assert {row["run_id"] for row in ws.catalog.current_artifacts().values()} == {forced.run_id}


@pytest.mark.parametrize("change", ["config", "input mtime", "input content"])
def test_changed_config_or_input_reruns(tmp_path, raw, change):
    ws = Workspace(tmp_path / "ws")
    body = Body(3)
    run_stage(ws, "prepare", CFG, inputs_for(raw), body)
    cfg = CFG
    if change == "config":
        cfg = PrepareConfig(input=Path("raw.json"), max_history=19)
    elif change == "input mtime":
        st = raw.stat()
        os.utime(raw, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    else:
        raw.write_text('{"u": [1, 2, 4]}')  # same size; the mtime moves
        os.utime(raw, ns=(0, raw.stat().st_mtime_ns + 1_000_000_000))
    out = run_stage(ws, "prepare", cfg, inputs_for(raw), body)
    assert not out.skipped and body.calls == 2


@pytest.mark.parametrize("damage", ["rewrite", "garbage", "delete"])
def test_outputs_changed_outside_bloger_rerun(tmp_path, raw, damage):
    ws = Workspace(tmp_path / "ws")
    body = Body(3)
    run_stage(ws, "prepare", CFG, inputs_for(raw), body)
    target = ws.path("users")
    if damage == "rewrite":  # a valid artifact with other rows
        write_arrow(users_table(2), target, make_metadata(SPECS["users"], "x", {}))
    elif damage == "garbage":
        with open(target, "ab") as fh:
            fh.write(b"junk")
    else:
        target.unlink()
    out = run_stage(ws, "prepare", CFG, inputs_for(raw), body)
    assert not out.skipped and body.calls == 2
    assert ws.info("users").rows == 3


@pytest.mark.parametrize("error", [DataError("bad rows"), KeyboardInterrupt(), ValueError()])
def test_failing_body_leaves_artifacts_and_records_failure(tmp_path, raw, error):
    ws = Workspace(tmp_path / "ws")
    good = run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    before, current = snapshot(ws), ws.catalog.current_artifacts()
    with pytest.raises(type(error)):
        run_stage(ws, "prepare", CFG, inputs_for(raw), Body(5, fail=error), force=True)
    assert snapshot(ws) == before and ws.catalog.current_artifacts() == current
    assert leftovers(ws) == []
    failed, done = ws.catalog.runs()
    status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    assert (failed.status, failed.error) == (status, str(error) or type(error).__name__)
    assert done.run_id == good.run_id and ws.catalog.last_done("prepare").run_id == good.run_id
    # the failed run does not count as up to date: the next plain run is still a no-op on the good one
    assert run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3)).run_id == good.run_id


def test_wrong_output_schema_replaces_nothing(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    before = snapshot(ws)

    def body(ctx):
        write_arrow(users_table(2), ctx.output("users"), ctx.metadata("users"))  # fine
        write_arrow(users_table(2), ctx.output("interactions"), ctx.metadata("interactions"))  # wrong columns
        return {}

    with pytest.raises(ArtifactError, match=r"interactions\.parquet\.tmp-\d+: missing column 'item_id'"):
        run_stage(ws, "prepare", CFG, inputs_for(raw), body, force=True)
    assert snapshot(ws) == before and leftovers(ws) == []


def test_declared_but_unwritten_output(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ArtifactError) as exc:
        run_stage(ws, "prepare", CFG, inputs_for(raw), lambda ctx: (ctx.output("users"), {})[1])
    assert str(exc.value) == "stage prepare did not write its users output"


def test_first_run_failure_removes_the_new_workspace(tmp_path, raw):
    ws = Workspace(tmp_path / "new" / "ws")
    with pytest.raises(DataError):
        run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3, fail=DataError("no rows")))
    assert not ws.root.exists()
    assert (tmp_path / "new").is_dir()  # only the workspace itself is removed


def test_failure_keeps_an_existing_empty_directory(tmp_path, raw):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        run_stage(Workspace(root), "prepare", CFG, inputs_for(raw), Body(3, fail=DataError("no rows")))
    assert (root / "notes.txt").read_text() == "mine"


def test_workspace_that_is_a_file(tmp_path):
    path = tmp_path / "ws"
    path.write_text("not a directory")
    with pytest.raises(WorkspaceError) as exc:
        Workspace(path)
    assert str(exc.value) == f"workspace {path} is a file, not a directory; give --workspace a directory path"
    assert exc.value.exit_code == 2 and path.read_text() == "not a directory"


def test_workspace_under_a_file(tmp_path, raw):
    (tmp_path / "f").write_text("x")
    ws = Workspace(tmp_path / "f" / "ws")
    with pytest.raises(WorkspaceError, match=r"^cannot create workspace .*/f/ws: Not a directory$"):
        run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))


def test_lock_held_in_this_process_makes_the_run_busy(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    body = Body(3)
    with FileLock(str(ws.root / ".bloger.lock")):
        start = time.monotonic()
        with pytest.raises(WorkspaceBusy) as exc:
            run_stage(ws, "prepare", CFG, inputs_for(raw), body, force=True, lock_timeout=0.2)
        assert time.monotonic() - start >= 0.2
    assert str(exc.value) == (f"workspace {ws.root} is in use by another bloger process (waited 0.2s); "
                              "wait for it to finish or raise --lock-timeout")
    assert exc.value.exit_code == 3 and body.calls == 0
    assert [r.status for r in ws.catalog.runs()] == ["done"]  # nothing recorded for the refused run
    assert ws.root.is_dir()


def test_lock_held_by_another_process(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; l = FileLock(sys.argv[1]); "
                               "l.acquire(); print('held', flush=True); sys.stdin.read()",
         str(ws.root / ".bloger.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy):
            run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3), lock_timeout=0.2)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3), lock_timeout=0.2).run_id  # free again


def test_lock_is_released_after_success_and_failure(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    with pytest.raises(DataError):
        run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3, fail=DataError("x")), force=True)
    lock = FileLock(str(ws.root / ".bloger.lock"))
    lock.acquire(timeout=0)
    lock.release()


def test_output_of_another_stage_is_refused(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(AssertionError, match="stage embed cannot write users"):
        run_stage(ws, "embed", CFG, {}, lambda ctx: ctx.output("users"))


# ----------------------------------------------------------------------------------------------- status


def state(ws: Workspace) -> tuple[str, str]:
    row = stage_status(ws)[0]
    assert row["stage"] == "prepare"
    return row["state"], row["reason"]


def test_status_missing_then_done(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    row = stage_status(ws)[0]
    assert row == {"stage": "prepare", "state": "missing", "reason": "run `bloger prepare`", "run_id": None,
                   "finished_at": None}
    out = run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    row = stage_status(ws)[0]
    assert (row["state"], row["reason"], row["run_id"]) == ("done", "up to date", out.run_id)


def test_status_missing_after_only_a_failed_run(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    with pytest.raises(DataError):
        run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3, fail=DataError("x")))
    assert state(ws) == ("missing", "run `bloger prepare`")


def test_status_stale_when_the_raw_input_changes(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    st = raw.stat()
    os.utime(raw, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touch: new mtime only
    assert state(ws) == ("stale", f"input {raw.resolve()} changed")
    run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    assert state(ws)[0] == "done"
    raw.write_text('{"u": [1, 2, 3, 4]}')  # new content (and size)
    assert state(ws) == ("stale", f"input {raw.resolve()} changed")
    raw.unlink()
    assert state(ws) == ("stale", f"input {raw.resolve()} is gone")


@pytest.mark.parametrize("damage", ["flip a byte", "append", "delete"])
def test_status_stale_when_an_artifact_is_touched_outside_bloger(tmp_path, raw, damage):
    ws = Workspace(tmp_path / "ws")
    run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    target = ws.path("interactions")
    data = bytearray(target.read_bytes())
    if damage == "flip a byte":  # footer intact: still readable Parquet
        data[8] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "append":  # no longer Parquet at all
        target.write_bytes(bytes(data) + b"\n")
    else:
        target.unlink()
    expected = f"{target} is missing" if damage == "delete" else f"{target} was modified outside bloger"
    assert state(ws) == ("stale", expected)


def test_status_after_force_rerun_points_at_the_new_run(tmp_path, raw):
    ws = Workspace(tmp_path / "ws")
    run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    out = run_stage(ws, "prepare", CFG, inputs_for(raw), Body(4), force=True)
    row = stage_status(ws)[0]
    assert (row["state"], row["run_id"]) == ("done", out.run_id)
    assert ws.info("users").rows == 4


def _other_process_runs_first(monkeypatch, ws: Workspace, raw: Path, body) -> None:
    """Simulate a second `bloger` that made the workspace after our existence check, before our lock."""
    real_lock = Workspace.lock

    def lock(self, timeout):
        if self is ws:
            monkeypatch.setattr(Workspace, "lock", real_lock)
            run_stage(Workspace(ws.root), "prepare", CFG, inputs_for(raw), body)
        return real_lock(self, timeout)

    monkeypatch.setattr(Workspace, "lock", lock)


def test_a_workspace_made_by_another_run_meanwhile_survives_our_no_op(tmp_path, raw, monkeypatch):
    ws = Workspace(tmp_path / "ws")  # does not exist yet when run_stage looks
    _other_process_runs_first(monkeypatch, ws, raw, Body(3))
    out = run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3))
    assert out.skipped
    assert ws.path("users").is_file() and state(ws)[0] == "done"


def test_a_workspace_made_by_another_run_meanwhile_survives_our_failure(tmp_path, raw, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    _other_process_runs_first(monkeypatch, ws, raw, Body(3))
    with pytest.raises(DataError):
        run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3, fail=DataError("x")), force=True)
    assert ws.path("users").is_file() and state(ws)[0] == "done"


def test_busy_on_a_workspace_another_run_is_creating_leaves_it(tmp_path, raw, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    real_lock = Workspace.lock

    def lock(self, timeout):  # the other process made the directory and holds the lock
        self.root.mkdir(exist_ok=True)
        (self.root / "theirs.txt").write_text("in progress")
        with FileLock(str(self.root / ".bloger.lock")):
            with real_lock(self, timeout):
                yield

    monkeypatch.setattr(Workspace, "lock", contextmanager(lock))
    with pytest.raises(WorkspaceBusy):
        run_stage(ws, "prepare", CFG, inputs_for(raw), Body(3), lock_timeout=0.1)
    assert (ws.root / "theirs.txt").read_text() == "in progress"
