"""Several runs per workspace (`--run NAME`): each run's checkpoints, history and metrics under
runs/NAME/, the data, embeddings and tokenizer shared and recorded as the run's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from bloger_cli.runs import list_runs
from bloger_cli.workspace import Workspace

TINY = ["--mode", "fixed", "--epochs", "1", "--device", "cpu", "--set", "model.d_model=16", "--set",
        "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.d_kv=8", "--set", "model.d_ff=32"]


def test_two_named_runs_share_the_upstream_and_keep_their_own_outputs(tokenized_workspace: Path, cli) -> None:
    ws = tokenized_workspace
    before = {p.name: p.read_bytes() for p in ws.glob("*.parquet")}
    for name, seed in (("a", "1"), ("b", "2")):
        result = cli("train-bilevel", "-w", ws, "--run", name, "--seed", seed, *TINY)
        assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        for file in ("best.pt", "last.pt", "history.parquet", "trained_semantic_ids.parquet"):
            assert (ws / "runs" / name / file).is_file(), f"runs/{name}/{file}"
    assert not (ws / "best.pt").exists()  # the unnamed run was never trained
    assert {p.name: p.read_bytes() for p in ws.glob("*.parquet")} == before  # shared artifacts untouched
    runs = {r.run_name: r for r in Workspace(ws).catalog.runs("train-bilevel", "done")}
    assert set(runs) == {"a", "b"} and runs["a"].inputs == runs["b"].inputs  # the same upstream inputs
    assert (runs["a"].config["seed"], runs["b"].config["seed"]) == (1, 2)

    # up to date per run: re-running a is a no-op, b is untouched by it
    again = cli("train-bilevel", "-w", ws, "--run", "a", "--seed", "1", *TINY, "--json")
    assert json.loads(again.stdout)["skipped"] is True

    # evaluate: --run picks one; without it, the latest trained run (b)
    named = json.loads(cli("evaluate", "-w", ws, "--run", "a", "--json", "--device", "cpu").stdout)
    latest = json.loads(cli("evaluate", "-w", ws, "--json", "--device", "cpu").stdout)
    assert named["result"]["checkpoint"] == str(ws / "runs" / "a" / "best.pt")
    assert latest["result"]["checkpoint"] == str(ws / "runs" / "b" / "best.pt")
    assert (ws / "runs" / "a" / "metrics.parquet").is_file() and (ws / "runs" / "b" / "metrics.parquet").is_file()

    rows = list_runs([ws], stage="evaluate")
    assert sorted(r["run"] for r in rows) == ["a", "b"]
    table = cli("runs", "-w", ws)
    assert table.exit_code == 0 and " a " in table.stderr and " b " in table.stderr

    status = json.loads(cli("status", "-w", ws, "--run", "a", "--json").stdout)
    assert status["run"] == "a"
    assert {r["stage"]: r["state"] for r in status["stages"]}["evaluate"] == "done"

    recs = cli("recommend", "-w", ws, "--run", "a", "-o", ws / "recs.jsonl", "--k", "5", "--device", "cpu")
    assert recs.exit_code == 0, recs.output
    assert len((ws / "recs.jsonl").read_text().splitlines()) > 0


def test_a_bad_run_name_is_one_clear_line(tokenized_workspace: Path, cli) -> None:
    result = cli("train-bilevel", "-w", tokenized_workspace, "--run", "../x", *TINY)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--run '../x': a run name is letters, digits, '.', '_' and '-'" in result.stderr
    assert not (tokenized_workspace / "runs").exists()


def test_a_workspace_from_before_named_runs_reads_as_one_run(trained_workspace: Path, cli) -> None:
    """Catalogs written before runs had names lack the run_name columns: they read as the unnamed run."""
    with duckdb.connect(str(trained_workspace / "catalog.duckdb")) as con:
        con.execute("ALTER TABLE runs DROP COLUMN run_name")
        con.execute("ALTER TABLE artifacts DROP COLUMN run_name")
    rows = list_runs([trained_workspace], stage="train-bilevel")
    assert [r["run"] for r in rows] == [None]
    status = json.loads(cli("status", "-w", trained_workspace, "--json").stdout)
    assert {r["stage"]: r["state"] for r in status["stages"]}["train-bilevel"] == "done"
    result = cli("evaluate", "-w", trained_workspace, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"]["checkpoint"] == str(trained_workspace / "best.pt")
