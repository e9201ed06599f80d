"""Non-finite losses and gradients never reach the weights: each mode skips and counts the step, stops
after `max_bad_steps` in a row with a one-line error, and keeps the last good checkpoints; a tokenizer
update that would make a weight non-finite is undone and the IDs stay."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from bloger_cli.artifacts import SPECS, load_torch
from bloger_cli.errors import Diverged
from bloger_cli.recommender.model import Recommender
from bloger_cli.stages import train
from bloger_cli.training import steps as steps_module
from bloger_cli.training.checkpoint import load_checkpoint
from bloger_cli.workspace import Workspace


def poison_training_forward(monkeypatch: pytest.MonkeyPatch, bad: callable) -> list[int]:
    """Make the recommender's training loss NaN on the training calls `bad(n)` says (n from 1); validation
    (no labels) is untouched. Returns the call counter."""
    real = Recommender.forward
    calls = [0]

    def forward(self, input_ids, attention_mask, decoder_input_ids, labels=None, **kwargs):
        out = real(self, input_ids, attention_mask, decoder_input_ids, labels, **kwargs)
        if labels is None or not torch.is_grad_enabled():
            return out
        calls[0] += 1
        return out._replace(loss=out.loss * math.nan) if bad(calls[0]) else out

    monkeypatch.setattr(Recommender, "forward", forward)
    return calls


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_state(cfg):
    """A seeded tiny recommender, its fresh optimiser state, and one batch of 4 samples."""
    from bloger_cli.data.samples import Samples
    from bloger_cli.recommender.batch import make_batch
    from bloger_cli.recommender.config import RecommenderConfig
    from bloger_cli.recommender.vocab import Vocab
    from bloger_cli.training.state import new_state

    codes = torch.stack([torch.arange(6) % 4, torch.arange(6) // 4, torch.arange(6)], dim=1)  # (6, 3)
    samples = Samples(torch.arange(4), torch.tensor([[0, 1, -1], [2, 3, 4], [5, -1, -1], [1, 2, 3]]),
                      torch.tensor([2, 5, 0, 4]))
    torch.manual_seed(0)
    model = Recommender(RecommenderConfig(levels=3, codebook_size=8, soft_levels=2, **cfg.model.model_dump()))
    return new_state(model, cfg, steps_per_epoch=2), make_batch(samples, codes, Vocab(3, 8))


def test_a_nan_loss_changes_neither_the_weights_nor_the_adamw_state(monkeypatch, train_config) -> None:
    cfg = train_config(train={"max_bad_steps": 5})
    state, batch = tiny_state(cfg)
    step = steps_module.fixed_step(cfg, None, torch.device("cpu"))
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    poison_training_forward(monkeypatch, lambda n: n == 1)
    assert float(step(state, batch)) == 0.0  # the skipped step adds no loss
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert state.optimizer.state_dict()["state"] == {}  # AdamW took no step: no moments, no step count
    assert all(p.grad is None for p in state.model.parameters())
    assert (state.bad.skipped, state.bad.streak) == (1, 1)
    assert math.isfinite(float(step(state, batch)))  # the next good step updates and ends the streak
    assert not torch.equal(before["shared.weight"], state.model.state_dict()["shared.weight"])
    assert (state.bad.skipped, state.bad.streak) == (1, 0)


def test_an_inf_weight_stops_the_run_after_max_bad_steps(train_config) -> None:
    cfg = train_config(train={"max_bad_steps": 3, "lr": 0.01})
    state, batch = tiny_state(cfg)
    step = steps_module.fixed_step(cfg, None, torch.device("cpu"))
    with torch.no_grad():
        state.model.shared.weight[3, 0] = math.inf
    step(state, batch)
    state.step = 1  # the loop counts steps; here by hand
    step(state, batch)
    state.step = 2
    with pytest.raises(Diverged) as caught:
        step(state, batch)
    assert str(caught.value) == (
        "recommender step 3 (epoch 1): 3 steps in a row had a non-finite loss or gradient (NaN or inf); stopped, "
        "nothing of this run replaced earlier artifacts; lower train.lr (now 0.01) or set train.precision=fp32 "
        "and run again")


class OtherRankSawNaN:
    """A stand-in for Distributed under torchrun whose any_ reports another rank's bad step."""

    enabled, world = True, 1

    def any_(self, flag, device=None):
        return True


def test_ranks_skip_together_when_another_rank_saw_a_nan(train_config) -> None:
    cfg = train_config()
    state, batch = tiny_state(cfg)
    state.dist = OtherRankSawNaN()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    steps_module.fixed_step(cfg, None, torch.device("cpu"))(state, batch)  # finite here, NaN elsewhere
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert state.bad.skipped == 1


def test_fixed_run_skips_and_counts_a_nan_step(tokenized_workspace: Path, monkeypatch, train_config) -> None:
    poison_training_forward(monkeypatch, lambda n: n == 2)
    ws = Workspace(tokenized_workspace)
    result = train.run(train_config(), ws).result
    assert result["skipped_steps"] == 1
    history = pq.read_table(ws.path("history")).to_pylist()
    assert [r["skipped_steps"] for r in history] == [1.0, 1.0]
    assert all(math.isfinite(r["train_loss"]) for r in history)
    weights = load_checkpoint(ws.path("last_checkpoint"))["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_diverged_run_keeps_the_last_good_checkpoints(trained_workspace: Path, monkeypatch, cli) -> None:
    from conftest import TINY_MODEL

    before = {p.name: digest(p) for p in trained_workspace.iterdir() if p.is_file()}
    poison_training_forward(monkeypatch, lambda n: n >= 3)  # step 2 validates and saves, then NaN on
    out = cli("train-bilevel", "-w", trained_workspace, "--mode", "fixed", "--epochs", "2", "--batch-size", "64",
              "--device", "cpu", *TINY_MODEL, "--set", "train.eval_every_steps=2", "--set", "train.max_bad_steps=3",
              "--force")
    assert out.exit_code == 1 and "Traceback" not in out.output
    lines = out.stderr.splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert lines[error] == (
        "error: recommender step 5 (epoch 1): 3 steps in a row had a non-finite loss or gradient (NaN or inf); "
        "stopped, nothing of this run replaced earlier artifacts")
    assert lines[error + 1] == "  hint: lower train.lr (now 0.0005) or set train.precision=fp32 and run again"
    after = {p.name: digest(p) for p in trained_workspace.iterdir() if p.is_file() and p.name != "catalog.duckdb"}
    assert after == {k: v for k, v in before.items() if k != "catalog.duckdb"}  # best.pt, last.pt, ... untouched
    # this run's checkpoints: best.pt at step 2, last.pt at step 4 after two skipped steps, so the same weights
    best, last = (load_checkpoint(trained_workspace / "training" / name) for name in ("best.pt", "last.pt"))
    assert (best["step"], last["step"], last["skipped_steps"]) == (2, 4, 2)
    assert all(torch.equal(best["model"][k], w) and torch.isfinite(w).all() for k, w in last["model"].items())


def test_joint_run_skips_a_nan_step_in_both_models(rqvae_workspace: Path, monkeypatch, train_config) -> None:
    poison_training_forward(monkeypatch, lambda n: n == 1)
    ws = Workspace(rqvae_workspace)
    result = train.run(train_config(mode="joint", epochs=1), ws).result
    assert result["skipped_steps"] == 1
    tok = load_torch(ws.path("trained_tokenizer"), SPECS["trained_tokenizer"])["state_dict"]
    assert all(torch.isfinite(w).all() for w in tok.values())


def bilevel(train_config, **overrides):
    return train_config(mode="bilevel", epochs=1, bilevel={"updates_per_epoch": 2, "tokenizer_lr": 0.05},
                        **overrides)


def assert_tokenizer_and_ids_unchanged(ws: Workspace) -> None:
    before = load_torch(ws.path("tokenizer"), SPECS["tokenizer"])["state_dict"]
    after = load_torch(ws.path("trained_tokenizer"), SPECS["trained_tokenizer"])["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (pq.read_table(ws.path("trained_semantic_ids")).column("codes").to_pylist()
            == pq.read_table(ws.path("semantic_ids")).column("codes").to_pylist())


def test_a_nan_meta_gradient_is_rejected_and_the_codes_stay(rqvae_workspace: Path, monkeypatch, train_config):
    real = steps_module.meta_gradients

    def nan_meta(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(grads={k: g * math.nan for k, g in out.grads.items()})

    monkeypatch.setattr(steps_module, "meta_gradients", nan_meta)
    ws = Workspace(rqvae_workspace)
    result = train.run(bilevel(train_config), ws).result
    assert (result["skipped_steps"], result["updates_skipped"]) == (2, 2)
    updates = [r for r in pq.read_table(ws.path("history")).to_pylist() if r["event"] == "tokenizer_update"]
    assert [r["non_finite"] for r in updates] == [1.0, 1.0] and all("churn" not in r for r in updates)
    assert_tokenizer_and_ids_unchanged(ws)


def test_an_update_that_makes_a_weight_inf_is_undone(rqvae_workspace: Path, monkeypatch, train_config):
    real = steps_module._limited_step

    def overflowing(state, data, max_churn):
        out = real(state, data, max_churn)
        with torch.no_grad():
            next(state.tokenizer.parameters()).view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(steps_module, "_limited_step", overflowing)
    ws = Workspace(rqvae_workspace)
    result = train.run(bilevel(train_config), ws).result
    assert result["updates_skipped"] == 2  # weights and AdamW moments restored: bit for bit the tokenizer
    assert_tokenizer_and_ids_unchanged(ws)


def test_tokenizer_pretraining_skips_nan_steps_then_stops(monkeypatch) -> None:
    from bloger_cli.config import TokenizeConfig
    from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
    from bloger_cli.tokenizer.trainer import train_rqvae

    real, calls = RQVAE.forward, [0]

    def forward(self, x, *args, **kwargs):
        out = real(self, x, *args, **kwargs)
        calls[0] += 1
        if calls[0] in (2, 3) or calls[0] >= 6:
            return out._replace(losses=out.losses._replace(total=out.losses.total * math.nan))
        return out

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model = RQVAE(RQVAEConfig(input_dim=8, code_dim=4, levels=2, codebook_size=4, hidden=[8]))
    monkeypatch.setattr(RQVAE, "forward", forward)
    cfg = TokenizeConfig(levels=2, codebook_size=4, epochs=3, batch_size=16, max_bad_steps=3, kmeans_iters=2)
    with pytest.raises(Diverged, match=r"^tokenize: RQ-VAE step 2 of epoch 4: 3 steps in a row") as caught:
        cfg.epochs = 4
        train_rqvae(model, x, cfg, torch.Generator().manual_seed(0))
    assert "lower lr (--set lr=...) (now 0.001) and run again" in str(caught.value)
    calls[0] = 0
    cfg.epochs = 2  # batches 2 and 3 skipped (the whole first epoch's second, the second's first), then done
    result = train_rqvae(model, x, cfg, torch.Generator().manual_seed(0))
    assert [r["skipped_steps"] for r in result.history] == [1, 2]
    assert all(torch.isfinite(p).all() for p in model.parameters())
