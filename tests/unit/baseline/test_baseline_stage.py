"""`bloger baseline` as a library stage: the workspace's split and metrics, artifacts, catalog runs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bloger_cli.baseline.config import BaselineConfig, SASRecConfig
from bloger_cli.data.samples import load_split, training_items
from bloger_cli.metrics import popularity_ranking, ranks, summarize
from bloger_cli.runs import list_runs
from bloger_cli.stages import baseline
from bloger_cli.workspace import Workspace

TINY = SASRecConfig(layers=1, heads=2, hidden=16, inner=32, dropout=0.0, lr=3e-3)


def sasrec_config(**overrides) -> BaselineConfig:
    return BaselineConfig(**{"epochs": 2, "batch_size": 64, "device": "cpu", "sasrec": TINY, **overrides})


def test_popularity_is_evaluate_s_popularity_row(items64_workspace: Path) -> None:
    ws = Workspace(items64_workspace)
    result = baseline.run(BaselineConfig(model="popularity", k=[5, 10]), ws).result
    sequences = ws.path("sequences")
    test = load_split(sequences, "test")
    top = popularity_ranking(training_items(sequences), 64, 10)
    assert result["metrics"] == summarize(ranks(top.expand(len(test), 10), test.target), [5, 10])
    assert (result["mode"], result["users"], result["items"]) == ("popularity", len(test), 64)
    assert not ws.path("baseline_checkpoint").exists()  # nothing trained


def test_sasrec_trains_on_the_split_and_records_a_run(items64_workspace: Path) -> None:
    ws = Workspace(items64_workspace)
    result = baseline.run(sasrec_config(), ws).result
    assert (result["epochs_run"], result["train_samples"]) == (2, len(load_split(ws.path("sequences"), "train")))
    assert set(result["metrics"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 5, 10, 20)}
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    history = pq.read_table(ws.path("baseline_history")).to_pylist()
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["train_loss"] < history[0]["train_loss"]
    assert ws.path("baseline_checkpoint").is_file()
    row = list_runs([items64_workspace], stage="baseline")[0]
    assert (row["mode"], row["seed"], row["status"]) == ("sasrec", 42, "done")
    assert row["metrics"]["ndcg@10"] == result["metrics"]["ndcg@10"]

    again = baseline.run(sasrec_config(), ws)
    assert again.skipped  # same inputs and config


def test_metrics_file_keeps_the_latest_run_of_each_model(items64_workspace: Path) -> None:
    ws = Workspace(items64_workspace)
    baseline.run(sasrec_config(epochs=1), ws)
    baseline.run(BaselineConfig(model="popularity"), ws)
    rows = pq.read_table(ws.path("baseline_metrics")).to_pylist()
    assert {r["method"] for r in rows} == {"sasrec", "popularity"} and len(rows) == 16
    assert {r["split"] for r in rows} == {"test"}
    assert baseline.run(sasrec_config(epochs=1), ws).skipped  # popularity in between: SASRec still up to date
    rows = pq.read_table(ws.path("baseline_metrics")).to_pylist()
    assert {r["method"] for r in rows} == {"sasrec", "popularity"}


def test_same_seed_same_metrics(items64_workspace: Path) -> None:
    ws = Workspace(items64_workspace)
    first = baseline.run(sasrec_config(epochs=1), ws).result["metrics"]
    second = baseline.run(sasrec_config(epochs=1), ws, force=True).result["metrics"]
    assert first == second


def test_without_prepare_says_what_to_run(tmp_path: Path) -> None:
    from bloger_cli.errors import ArtifactError

    with pytest.raises(ArtifactError) as info:
        baseline.run(BaselineConfig(model="popularity"), Workspace(tmp_path / "empty"))
    assert info.value.message == f"no sequences artifact at {tmp_path / 'empty' / 'sequences.parquet'}"
    assert info.value.hint == "run `bloger prepare` first"


def test_hidden_must_divide_into_heads() -> None:
    with pytest.raises(ValueError, match=r"hidden \(10\) must be a multiple of heads \(3\)"):
        SASRecConfig(hidden=10, heads=3)


def test_a_time_budget_ends_sasrec_inside_an_epoch_with_a_validation(items64_workspace: Path) -> None:
    ws = Workspace(items64_workspace)
    result = baseline.run(sasrec_config(epochs=50, batch_size=4, time_budget="0.05s", patience=None), ws).result
    assert result["stopped_by"] == "time_budget" and result["epochs_run"] < 50
    history = pq.read_table(ws.path("baseline_history")).to_pylist()
    assert len(history) == result["epochs_run"] and history[-1]["val_ndcg_10"] is not None
    assert result["steps"] < 50 * -(-result["train_samples"] // 4)


def test_the_time_budget_reads_like_train_bilevels() -> None:
    assert sasrec_config(time_budget="1m30s").time_budget == 90.0
    with pytest.raises(ValueError, match="time budget must be a duration"):
        sasrec_config(time_budget="soon")
