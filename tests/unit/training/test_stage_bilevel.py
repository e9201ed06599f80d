"""train-bilevel in modes joint and bilevel: the tokenizer trains, the IDs follow it, history records
every tokenizer update, resume is exact, and bad settings are refused clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_stage import Killed, _kill_after_first_epoch

from bloger_cli.artifacts import SPECS, load_torch
from bloger_cli.errors import ArtifactError, ConfigError
from bloger_cli.stages import train
from bloger_cli.training import setup
from bloger_cli.training.checkpoint import load_checkpoint
from bloger_cli.workspace import Workspace


def bilevel_config(train_config, **overrides):
    # a tokenizer lr large enough that a few updates change some codes of the 64 items
    values = {"mode": "bilevel", "bilevel": {"updates_per_epoch": 2, "tokenizer_lr": 0.05}, **overrides}
    return train_config(**values)


def tokenizer_weights(path: Path, kind: str) -> dict[str, torch.Tensor]:
    return load_torch(path, SPECS[kind])["state_dict"]


def test_bilevel_trains_the_tokenizer_and_records_each_update(rqvae_workspace: Path, train_config) -> None:
    ws = Workspace(rqvae_workspace)
    result = train.run(bilevel_config(train_config), ws).result
    assert result["mode"] == "bilevel" and result["tokenizer_updates"] == 4  # 2 per epoch, 2 epochs
    history = pq.read_table(ws.path("history")).to_pylist()
    assert [r["event"] for r in history] == ["tokenizer_update", "tokenizer_update", "epoch"] * 2
    update = history[0]
    names = [k[len("cos/"):] for k in update if k.startswith("cos/") and update[k] is not None]
    assert "quantizer.codebooks.0" in names and all(update[f"surgery/{n}"] in (0.0, 1.0) for n in names)
    assert 0.0 <= update["collision_rate"] <= 1.0 and 0.0 < update["level1_density"] <= 1.0
    assert update["outer_loss"] > 0 and update["tok_loss"] > 0 and 0.0 <= update["conflict_fraction"] <= 1.0
    before = tokenizer_weights(ws.path("tokenizer"), "tokenizer")
    after = tokenizer_weights(ws.path("trained_tokenizer"), "trained_tokenizer")
    assert not torch.equal(before["quantizer.codebooks.0"], after["quantizer.codebooks.0"])
    best = load_checkpoint(ws.path("checkpoint"))
    trained = pq.read_table(ws.path("trained_semantic_ids")).column("codes").to_pylist()
    assert torch.equal(best["codes"].long(), torch.tensor(trained))  # the IDs the best model decodes with
    assert len({tuple(c) for c in trained}) == 64  # still one-to-one
    # the IDs are those of the trained tokenizer
    from bloger_cli.tokenizer.io import load_tokenizer, read_embeddings
    from bloger_cli.tokenizer.semantic_ids import semantic_ids

    item_ids, x = read_embeddings(ws.path("embeddings"))
    again = semantic_ids(load_tokenizer(ws.path("trained_tokenizer"), input_dim=16), x, item_ids, 16,
                         torch.device("cpu")).codes
    # (the disambiguation codes are those kept through the updates: same prefixes, still one-to-one)
    assert torch.equal(again[torch.argsort(item_ids)][:, :-1], torch.tensor(trained)[:, :-1])


def test_fixed_leaves_the_tokenizer_bit_for_bit(rqvae_workspace: Path, train_config) -> None:
    ws = Workspace(rqvae_workspace)
    train.run(train_config(mode="fixed"), ws)
    before = tokenizer_weights(ws.path("tokenizer"), "tokenizer")
    after = tokenizer_weights(ws.path("trained_tokenizer"), "trained_tokenizer")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_joint_updates_both_every_step(rqvae_workspace: Path, train_config) -> None:
    ws = Workspace(rqvae_workspace)
    result = train.run(train_config(mode="joint", bilevel={"tokenizer_lr": 0.05}), ws).result
    assert result["tokenizer_updates"] == result["steps"]
    assert [r["event"] for r in pq.read_table(ws.path("history")).to_pylist()] == ["epoch", "epoch"]
    before = tokenizer_weights(ws.path("tokenizer"), "tokenizer")
    after = tokenizer_weights(ws.path("trained_tokenizer"), "trained_tokenizer")
    assert not torch.equal(before["encoder.0.weight"], after["encoder.0.weight"])


def test_bilevel_resume_equals_uninterrupted_training(rqvae_workspace: Path, tmp_path: Path, train_config,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    shutil.copytree(rqvae_workspace, other)
    cfg = bilevel_config(train_config, epochs=3)
    train.run(cfg, Workspace(other))
    with monkeypatch.context() as patch:
        _kill_after_first_epoch(patch)
        with pytest.raises(Killed):
            train.run(cfg, Workspace(rqvae_workspace))
    train.run(cfg, Workspace(rqvae_workspace), resume=True)
    drop = ["seconds", "samples_per_s", "elapsed"]  # wall time
    assert pq.read_table(other / "history.parquet").drop(drop).to_pylist() == \
        pq.read_table(rqvae_workspace / "history.parquet").drop(drop).to_pylist()
    a, b = load_checkpoint(other / "last.pt"), load_checkpoint(rqvae_workspace / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["tokenizer_state"][k], b["tokenizer_state"][k]) for k in a["tokenizer_state"])
    assert torch.equal(a["codes"], b["codes"])


def test_resume_with_another_mode_is_refused(rqvae_workspace: Path, train_config,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        _kill_after_first_epoch(patch)
        with pytest.raises(Killed):
            train.run(bilevel_config(train_config), Workspace(rqvae_workspace))
    with pytest.raises(ConfigError, match=r"mode: 'bilevel' then, 'joint' now|mode: bilevel then, joint now"):
        train.run(bilevel_config(train_config, mode="joint"), Workspace(rqvae_workspace), resume=True)


def test_bilevel_on_residual_kmeans_says_what_to_do(tokenized_workspace: Path, train_config) -> None:
    with pytest.raises(ConfigError, match=r"residual k-means, which has no trainable encoder") as info:
        train.run(bilevel_config(train_config), Workspace(tokenized_workspace))
    assert "--method rqvae" in info.value.hint


def test_tokenizer_trained_on_other_embeddings_is_refused(rqvae_workspace: Path, train_config, make_embeddings) -> None:
    make_embeddings(rqvae_workspace, np.random.default_rng(1).normal(size=(64, 8)))  # 8-d, tokenizer 16-d
    with pytest.raises(ArtifactError, match=r"semantic_ids.parquet was made from another embeddings artifact"):
        train.run(bilevel_config(train_config), Workspace(rqvae_workspace))
    with pytest.raises(ArtifactError, match=r"trained on 16-d embeddings, but the embeddings are 8-d"):
        ws = Workspace(rqvae_workspace)  # past the lineage check: the tokenizer's own dimension check
        setup.load_tokenizer_side(bilevel_config(train_config), {k: ws.info(k) for k in ("tokenizer", "embeddings")}, 64)


@pytest.mark.parametrize("args, message", [
    (["--lambda", "-1"], "bilevel.lam"),
    (["--set", "bilevel.tokenizer_every=0"], "bilevel.tokenizer_every"),
    (["--surgery", "magic"], "bilevel.surgery"),
    (["--updates-per-epoch", "0"], "bilevel.updates_per_epoch"),
    (["--set", "bilevel.freeze_last=1.5"], "bilevel.freeze_last: freeze_last is the share of the run at its end "
     "with the tokenizer frozen, 0 <= share < 1 (got 1.5): a freeze of the whole run is --mode fixed"),
    (["--set", "bilevel.max_churn=0"], "bilevel.max_churn: Input should be greater than 0 (got 0)"),
    (["--set", "bilevel.max_churn=1.5"], "bilevel.max_churn: Input should be less than or equal to 1 (got 1.5)"),
    (["--set", "bilevel.meta_batches=0"], "bilevel.meta_batches: Input should be greater than or equal to 1 (got 0)"),
    (["--set", "bilevel.routing=detached"], "bilevel.routing"),
    (["--set", "bilevel.tok_loss=median"], "bilevel.tok_loss"),
])
def test_bad_bilevel_options_are_usage_errors(cli, rqvae_workspace: Path, args, message) -> None:
    result = cli("train-bilevel", "-w", rqvae_workspace, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_frozen_tokenizer_leaves_churn_at_zero_and_ids_bit_for_bit(rqvae_workspace: Path, train_config) -> None:
    # re-coding with an unchanged tokenizer: nothing moves, not even a disambiguation code
    from bloger_cli.recommender.config import RecommenderConfig
    from bloger_cli.recommender.model import Recommender
    from bloger_cli.training.state import new_state
    from bloger_cli.training.steps import churn, commit_codes, recode

    cfg = bilevel_config(train_config)
    ws = Workspace(rqvae_workspace)
    data, soft = setup.load_data(cfg, {k: ws.info(k) for k in ("sequences", "semantic_ids")})
    tokenizer, data.embeddings = setup.load_tokenizer_side(cfg, {k: ws.info(k) for k in ("tokenizer", "embeddings")},
                                                           len(data.codes))
    model = Recommender(RecommenderConfig(levels=data.vocab.levels, codebook_size=16, soft_levels=soft,
                                          **cfg.model.model_dump()))
    state = new_state(model, cfg, 1, tokenizer)
    before = data.codes.clone()
    row = commit_codes(state, data, recode(state, data), remember=True)
    assert torch.equal(data.codes, before) and torch.equal(state.codes_before.long(), before)
    assert row["churn"] == row["churn_weighted"] == row["churn_valid_targets"] == 0.0
    assert all(row[f"churn_level{level}"] == 0.0 for level in range(1, data.codes.shape[1] + 1))
    moved = before.clone()
    moved[:16, 0] = (moved[:16, 0] + 1) % 16  # a quarter of the 64 items re-coded at level 1
    assert churn(before, moved, data)["churn_level1"] == 0.25 and churn(before, moved, data)["churn_level2"] == 0.0


def test_churn_limit_scales_updates_back(rqvae_workspace: Path, train_config) -> None:
    ws = Workspace(rqvae_workspace)
    cfg = bilevel_config(train_config, epochs=2, bilevel={"updates_per_epoch": 1, "tokenizer_lr": 0.05,
                                                          "max_churn": 0.05, "settle_steps": 0})
    train.run(cfg, ws)
    updates = [r for r in pq.read_table(ws.path("history")).to_pylist() if r["event"] == "tokenizer_update"]
    assert updates and all(r["scale"] < 1.0 for r in updates)  # lr 0.05 moves far more than 5% of items
    assert all(r["churn"] is None or r["churn"] <= 0.05 for r in updates)
    from bloger_cli.runs import list_runs

    run = next(r for r in list_runs([rqvae_workspace]) if r["stage"] == "train-bilevel")
    recoded = [r["churn"] for r in updates if r["churn"] is not None]
    assert run["churn"] == pytest.approx(sum(recoded) / len(recoded) if recoded else None)  # shown by `bloger runs`
