"""train.tracker = "tensorboard": every history row reaches TensorBoard's event files as it is written, a
resumed run goes on in the same directory, and without the package the run stops with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL
from typer.testing import CliRunner

from bloger_cli.cli import app
from bloger_cli.config import TrainBilevelConfig, config_hash
from bloger_cli.errors import ConfigError, Interrupted
from bloger_cli.stages import train
from bloger_cli.training.tracker import TensorBoardTracker, open_tracker, scalars
from bloger_cli.workspace import Workspace

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="the tensorboard extra is not installed")


def _read(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files of `directory` -> [(step, value)], as TensorBoard shows them."""
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_rows_become_tags_by_event() -> None:
    assert scalars({"event": "epoch", "epoch": 2, "step": 40, "train_loss": 1.5, "lr": 1e-3, "val_ndcg_10": 0.2,
                    "val_recall_10": None}) == [("train/train_loss", 1.5), ("train/lr", 1e-3), ("val/ndcg_10", 0.2)]
    assert scalars({"event": "eval", "epoch": 2, "step": 30, "lr": 1e-3, "val_recall_10": 0.4}) == [
        ("eval/lr", 1e-3), ("val/recall_10", 0.4)]
    assert scalars({"event": "tokenizer_update", "step": 3, "churn": 0.25, "cos/x": -0.5, "non_finite": True,
                    "note": "text"}) == [("tokenizer/churn", 0.25), ("tokenizer/cos/x", -0.5)]


def test_the_writer_round_trips_and_leaves_non_finite_values_out(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb")
    tracker.log({"event": "epoch", "step": 5, "train_loss": 2.0})
    tracker.log({"event": "epoch", "step": 10, "train_loss": float("nan")})
    tracker.log({"event": "epoch", "step": 15, "train_loss": 1.0})
    tracker.close()
    assert _read(tmp_path / "tb") == {"train/train_loss": [(5, 2.0), (15, 1.0)]}


def test_none_opens_nothing_and_the_setting_leaves_the_config_hash_alone(train_config) -> None:
    assert open_tracker("none", Path("unused")) is None
    assert config_hash(train_config(train={"tracker": "tensorboard"})) == config_hash(train_config())


def test_a_run_mirrors_its_history_into_tensorboard(rqvae_workspace: Path, train_config) -> None:
    cfg = train_config(mode="bilevel", epochs=2, batch_size=16, train={"tracker": "tensorboard"},
                       bilevel={"updates_per_epoch": 2, "tokenizer_lr": 0.05})
    result = train.run(cfg, Workspace(rqvae_workspace))
    runs = sorted((rqvae_workspace / "tensorboard").iterdir())
    assert [p.name for p in runs] == [result.run_id]
    tags = _read(runs[0])
    history = pq.read_table(rqvae_workspace / "history.parquet").to_pylist()
    epochs = [r for r in history if r["event"] == "epoch"]
    updates = [r for r in history if r["event"] == "tokenizer_update"]
    assert len(epochs) == 2 and len(updates) == 4
    assert tags["train/train_loss"] == [(r["step"], pytest.approx(r["train_loss"])) for r in epochs]
    assert tags["val/ndcg_10"] == [(r["step"], pytest.approx(r["val_ndcg_10"])) for r in epochs]
    assert [step for step, _ in tags["tokenizer/churn"]] == [r["step"] for r in updates]
    assert [v for _, v in tags["tokenizer/conflict_fraction"]] == pytest.approx(
        [r["conflict_fraction"] for r in updates])


def test_a_named_run_gets_its_own_folder(tokenized_workspace: Path) -> None:
    out = CliRunner().invoke(app, ["train-bilevel", "-w", str(tokenized_workspace), "--run", "tb-demo", "--mode",
                                   "fixed", *TINY_MODEL, "--set", "epochs=1", "--set", "device=cpu", "--set",
                                   "train.tracker=tensorboard", "--json"])
    assert out.exit_code == 0, out.output
    (folder,) = (tokenized_workspace / "tensorboard" / "tb-demo").iterdir()
    assert "train/train_loss" in _read(folder)


def test_a_resumed_run_goes_on_in_the_same_folder(tokenized_workspace: Path, train_config, monkeypatch) -> None:
    cfg = train_config(epochs=3, batch_size=16, train={"tracker": "tensorboard", "patience": None})
    with monkeypatch.context() as patch:
        calls = [0]

        def stop() -> bool:
            calls[0] += 1
            return calls[0] >= 10  # mid-epoch 2: epoch 1's row is written and saved

        class Stop:
            def __enter__(self):
                return stop

            def __exit__(self, *exc):
                return False

        patch.setattr(train, "stop_on_sigint", lambda enabled: Stop())
        with pytest.raises(Interrupted):
            train.run(cfg, Workspace(tokenized_workspace))
    train.run(cfg, Workspace(tokenized_workspace), resume=True)
    folders = list((tokenized_workspace / "tensorboard").iterdir())
    assert len(folders) == 1  # the resumed run wrote beside the first part
    epochs = [r for r in pq.read_table(tokenized_workspace / "history.parquet").to_pylist() if r["event"] == "epoch"]
    assert _read(folders[0])["train/train_loss"] == [(r["step"], pytest.approx(r["train_loss"])) for r in epochs]


def test_without_the_package_the_run_stops_with_one_line(tokenized_workspace: Path, train_config,
                                                         monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    before = sorted(p.name for p in tokenized_workspace.iterdir())
    with pytest.raises(ConfigError, match="needs the tensorboard package") as info:
        train.run(train_config(train={"tracker": "tensorboard"}), Workspace(tokenized_workspace))
    assert "bloger[tensorboard]" in (info.value.hint or "")
    assert not (tokenized_workspace / "history.parquet").exists()
    assert sorted(p.name for p in tokenized_workspace.iterdir() if p.name != "tensorboard") == \
        sorted(n for n in before if n != "tensorboard")


def test_an_unknown_tracker_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="tracker"):
        TrainBilevelConfig(train={"tracker": "wandb"})
