"""train-bilevel --mode fixed through the stage runner: outputs, history, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from bloger_cli.artifacts import SPECS, load_torch
from bloger_cli.errors import ConfigError
from bloger_cli.stages import train
from bloger_cli.training.checkpoint import load_checkpoint
from bloger_cli.workspace import Workspace


def test_fixed_run_writes_checkpoints_history_and_ids(trained_workspace: Path) -> None:
    ws = Workspace(trained_workspace)
    history = pq.read_table(ws.path("history")).to_pylist()
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["train_loss"] > 0 and row["val_recall_10"] is not None for row in history)
    assert history[1]["step"] == 2 * history[0]["step"]
    best, last = load_checkpoint(ws.path("checkpoint")), load_checkpoint(ws.path("last_checkpoint"))
    assert last["epoch"] == 2 and best["epoch"] in (1, 2) and best["mode"] == "fixed"
    assert not (trained_workspace / "training").exists()  # the in-progress directory is gone
    # mode fixed: the tokenizer and the IDs are exactly those of `bloger tokenize`
    ids = pq.read_table(ws.path("semantic_ids")).to_pylist()
    assert pq.read_table(ws.path("trained_semantic_ids")).to_pylist() == ids
    assert torch.equal(best["codes"].long(), torch.tensor([row["codes"] for row in ids]))
    before = load_torch(ws.path("tokenizer"), SPECS["tokenizer"])["state_dict"]
    after = load_torch(ws.path("trained_tokenizer"), SPECS["trained_tokenizer"])["state_dict"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_second_run_with_same_config_is_a_noop(trained_workspace: Path, train_config) -> None:
    out = train.run(train_config(), Workspace(trained_workspace))
    assert out.skipped


class Killed(Exception):
    pass


def _kill_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fit = train.fit

    def fit(state, data, cfg, step_fn, device, save, stop):
        def save_then_die(state, improved):
            save(state, improved)
            raise Killed

        return real_fit(state, data, cfg, step_fn, device, save_then_die, stop)

    monkeypatch.setattr(train, "fit", fit)


def test_resume_equals_uninterrupted_training(tokenized_workspace: Path, tmp_path: Path, train_config,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tokenized_workspace, other)
    cfg = train_config(epochs=3, model=train_config().model.model_copy(update={"dropout": 0.1}))
    train.run(cfg, Workspace(other))  # uninterrupted

    with monkeypatch.context() as patch:
        _kill_after_first_epoch(patch)
        with pytest.raises(Killed):
            train.run(cfg, Workspace(tokenized_workspace))
    assert (tokenized_workspace / "training" / "last.pt").is_file()
    assert not (tokenized_workspace / "best.pt").exists()  # nothing committed by the killed run
    train.run(cfg, Workspace(tokenized_workspace), resume=True)

    a = pq.read_table(other / "history.parquet").drop(["seconds", "samples_per_s", "elapsed"]).to_pylist()
    b = pq.read_table(tokenized_workspace / "history.parquet").drop(["seconds", "samples_per_s", "elapsed"]).to_pylist()
    assert a == b
    wa, wb = load_checkpoint(other / "last.pt")["model"], load_checkpoint(tokenized_workspace / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_an_interrupted_run_is_refused(tokenized_workspace: Path, train_config) -> None:
    with pytest.raises(ConfigError, match="nothing to resume in .*: no interrupted run"):
        train.run(train_config(), Workspace(tokenized_workspace), resume=True)


def test_resume_with_another_config_is_refused(tokenized_workspace: Path, train_config,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        _kill_after_first_epoch(patch)
        with pytest.raises(Killed):
            train.run(train_config(epochs=3), Workspace(tokenized_workspace))
    with pytest.raises(ConfigError, match=r"it was trained with another config \(batch_size: 64 then, 32 now\)"):
        train.run(train_config(epochs=3, batch_size=32), Workspace(tokenized_workspace), resume=True)


def test_training_without_semantic_ids_names_the_stage(items64_workspace: Path, train_config) -> None:
    from bloger_cli.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no semantic_ids artifact at .*semantic_ids.parquet") as info:
        train.run(train_config(), Workspace(items64_workspace))
    assert info.value.hint == "run `bloger tokenize` first"


@pytest.mark.parametrize("args, message", [
    (["--set", "model.d_model=0"], "model.d_model"),
    (["--set", "model.colour=blue"], "model.colour"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["--epochs", "0"], "epochs"),
    (["--mode", "tiger"], "mode"),
    (["--device", "tpu"], "device"),
    (["--time-budget", "soon"], "train.time_budget: time budget must be a duration like 90s, 20m or 1h30m "
                                "(got 'soon')"),
    (["--time-budget", "0m"], "train.time_budget: time budget must be more than 0 seconds (got '0m')"),
    (["--max-steps", "0"], "train.max_steps: Input should be greater than or equal to 1 (got 0)"),
])
def test_bad_training_options_are_one_line_usage_errors(cli, tokenized_workspace: Path, args, message) -> None:
    before = sorted(p.name for p in tokenized_workspace.iterdir())
    result = cli("train-bilevel", "-w", tokenized_workspace, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tokenized_workspace.iterdir()) == before  # nothing written


def test_compile_wraps_the_training_forward_only(tokenized_workspace: Path, train_config, monkeypatch) -> None:
    from bloger_cli.recommender.model import Recommender

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    train.run(train_config(epochs=1, train={"compile": True}), Workspace(tokenized_workspace))
    assert len(compiled) == 1 and isinstance(compiled[0], Recommender)
