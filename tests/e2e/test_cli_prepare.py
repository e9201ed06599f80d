"""`bloger prepare` then `bloger status` through the installed console script, on the tiny letter set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

NO_CORE = ["--min-user-interactions", "1", "--min-item-interactions", "1"]


def bloger_command() -> list[str]:
    """The `bloger` script installed beside this interpreter, else `python -m bloger_cli`."""
    script = Path(sys.executable).with_name("bloger")
    if script.is_file():
        return [str(script)]
    found = shutil.which("bloger")
    return [found] if found else [sys.executable, "-m", "bloger_cli"]


def bloger(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BLOGER_WORKSPACE"}
    return subprocess.run([*bloger_command(), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def as_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1, proc.stdout
    return json.loads(proc.stdout)


@pytest.fixture
def work(tmp_path, tiny_letter) -> tuple[Path, Path]:
    return tmp_path, tiny_letter


def test_prepare_status_noop_force(work):
    cwd, data = work
    ws = cwd / "work" / "tiny"

    first = as_json(bloger("prepare", "-w", ws, "--input", data, *NO_CORE, "--json", cwd=cwd))
    assert first["stage"] == "prepare" and not first["skipped"]
    assert (first["result"]["users"], first["result"]["items"], first["result"]["interactions"]) == (3, 5, 12)

    rows = {kind: pq.read_metadata(ws / f"{kind}.parquet").num_rows
            for kind in ("interactions", "users", "items", "sequences")}
    assert rows == {"interactions": 12, "users": 3, "items": 5, "sequences": 3}
    assert sorted(p.name for p in ws.iterdir() if not p.name.startswith(".")) == [
        "catalog.duckdb", "interactions.parquet", "items.parquet", "sequences.parquet", "users.parquet"]
    assert not list(ws.glob(".*.tmp-*"))
    assert pq.read_table(ws / "sequences.parquet").column("items").to_pylist() == [
        [4, 0, 1, 2], [0, 1, 2, 4, 3], [1, 0, 4]]

    status = as_json(bloger("status", "-w", ws, "--json", cwd=cwd))
    assert [(s["stage"], s["state"], s["run_id"]) for s in status["stages"]] == [
        ("prepare", "done", first["run_id"]), ("embed", "missing", None), ("tokenize", "missing", None),
        ("train-bilevel", "missing", None), ("evaluate", "missing", None), ("baseline", "missing", None)]

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in ws.glob("*.parquet")}
    again = bloger("prepare", "-w", ws, "--input", data, *NO_CORE, cwd=cwd)
    assert again.returncode == 0 and again.stdout == ""
    assert f"prepare is up to date (run {first['run_id']}); use --force to redo it" in again.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in ws.glob("*.parquet")} == before

    forced = as_json(bloger("prepare", "-w", ws, "--input", data, *NO_CORE, "--force", "--json", cwd=cwd))
    assert not forced["skipped"] and forced["run_id"] != first["run_id"]
    assert forced["result"] == first["result"]
    status = as_json(bloger("status", "-w", ws, "--json", cwd=cwd))
    assert status["stages"][0]["state"] == "done" and status["stages"][0]["run_id"] == forced["run_id"]


def test_changed_input_makes_the_stage_stale_and_reruns_it(work):
    cwd, data = work
    ws = cwd / "ws"
    first = as_json(bloger("prepare", "-w", ws, "--input", data, *NO_CORE, "--json", cwd=cwd))
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    row = as_json(bloger("status", "-w", ws, "--json", cwd=cwd))["stages"][0]
    assert (row["state"], row["reason"]) == ("stale", f"input {data.resolve()} changed")
    rerun = as_json(bloger("prepare", "-w", ws, "--input", data, *NO_CORE, "--json", cwd=cwd))
    assert not rerun["skipped"] and rerun["run_id"] != first["run_id"]


def test_data_moved_elsewhere_reruns_prepare_with_the_same_bytes(work):
    """The raw file's place is an input, not config: prepare re-runs, but its artifacts come out byte for
    byte the same, so the stages downstream (which key on their content) stay up to date."""
    cwd, data = work
    ws = cwd / "ws"
    first = as_json(bloger("prepare", "-w", ws, "--input", data, *NO_CORE, "--json", cwd=cwd))
    before = {p.name: p.read_bytes() for p in ws.glob("*.parquet")}
    moved = shutil.copytree(data.parent, cwd / "elsewhere") / data.name  # with its items file
    rerun = as_json(bloger("prepare", "-w", ws, "--input", moved, *NO_CORE, "--json", cwd=cwd))
    assert not rerun["skipped"] and rerun["run_id"] != first["run_id"]
    assert {p.name: p.read_bytes() for p in ws.glob("*.parquet")} == before


def test_relative_paths_and_default_workspace(work):
    cwd, data = work
    out = as_json(bloger("prepare", "--input", data.relative_to(cwd), *NO_CORE, "--json", cwd=cwd))
    assert (cwd / "bloger-work" / "sequences.parquet").is_file() and not out["skipped"]
    row = as_json(bloger("status", "--json", cwd=cwd))["stages"][0]
    assert row["state"] == "done"


def test_error_exit_code_through_the_script(work):
    cwd, data = work
    proc = bloger("prepare", "-w", cwd / "ws", "--input", data, cwd=cwd)  # default 5-core: nothing left
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {data}: no interactions left after filtering")
    assert not (cwd / "ws").exists()
