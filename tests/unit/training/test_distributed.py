"""Data-parallel training: each rank's slice of a global batch, and a 2-process torchrun (gloo, CPU)
taking the same steps as one process on the same global batches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_MODEL

from bloger_cli.artifacts import SPECS, load_torch
from bloger_cli.training.checkpoint import load_checkpoint
from bloger_cli.training.distributed import Distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def test_slices_cover_the_global_batch_with_shares_summing_to_one() -> None:
    index = torch.arange(10, 17)  # 7 samples over 2 ranks: 4 + 3
    parts = [Distributed(rank, 2).shard(index) for rank in range(2)]
    assert torch.equal(torch.cat([p for p, _ in parts]), index)
    assert [share for _, share in parts] == [4 / 7, 3 / 7]
    assert Distributed().shard(index) == (index, 1.0)


def test_a_rank_without_samples_computes_on_a_stand_in_with_share_zero() -> None:
    index = torch.tensor([5])  # a last batch of 1 sample, 2 ranks
    local, share = Distributed(1, 2).shard(index)
    assert torch.equal(local, index) and share == 0.0
    assert Distributed(0, 2).shard(index)[1] == 1.0


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_all_reduced_meta_gradient_is_the_single_process_one(tmp_path: Path) -> None:
    """Inner gradient, v and the tokenizer gradient summed over ranks with their shares: the same
    second-order gradient as one process on the whole batch (float64, a large look-ahead step)."""
    from test_bilevel import setup

    from bloger_cli.recommender.batch import Batch
    from bloger_cli.training.bilevel import meta_gradients

    _launch(str(Path(__file__).with_name("meta_worker.py")), str(tmp_path / "meta.pt"))
    got = torch.load(tmp_path / "meta.pt")
    tokenizer, model, x, batch, _ = setup(torch.float64)
    want = meta_gradients(model, tokenizer, x, Batch(*(t[:3] for t in batch)), eta=0.5, lam=0.5,
                          surgery_method="pcgrad")
    for name, value in want.grads.items():
        torch.testing.assert_close(got["grads"][name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert got["losses"] == pytest.approx([want.inner_loss, want.outer_loss, want.tok_loss], rel=1e-9)


OPTIONS = [*TINY_MODEL, "--set", "device=cpu", "--set", "epochs=2", "--set", "batch_size=48",
           "--set", "train.val_users=40", "--set", "bilevel.updates_per_epoch=2"]


def _history(workspace: Path) -> list[dict]:
    return pq.read_table(workspace / SPECS["history"].filename).to_pylist()


@pytest.mark.parametrize("mode", ["fixed", "bilevel"])
def test_two_processes_take_the_steps_of_one(mode: str, rqvae_workspace: Path, tmp_path: Path, cli) -> None:
    one, two = rqvae_workspace, tmp_path / "two"
    shutil.copytree(one, two)
    args = ["--mode", mode, *OPTIONS]
    result = cli("train-bilevel", "-w", str(one), *args)
    assert result.exit_code == 0, result.output
    _launch("-m", "bloger_cli", "train-bilevel", "-w", str(two), *args)

    single, double = _history(one), _history(two)
    assert [r["event"] for r in single] == [r["event"] for r in double]
    for a, b in zip(single, double):
        for key in ("train_loss", "inner_loss", "outer_loss", "tok_loss"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["event"], a["step"])
        if a["event"] == "epoch":
            assert b["val_recall_10"] == pytest.approx(a["val_recall_10"], abs=0.03)  # whole users may flip
    weights = [load_checkpoint(ws / SPECS["last_checkpoint"].filename)["model"] for ws in (one, two)]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-3, atol=1e-4, msg=name)
    if mode == "bilevel":  # the tokenizer's gradients were all-reduced: the same tokenizer on every rank
        tokenizers = [load_torch(ws / SPECS["trained_tokenizer"].filename, SPECS["trained_tokenizer"])["state_dict"]
                      for ws in (one, two)]
        for name, value in tokenizers[0].items():
            torch.testing.assert_close(tokenizers[1][name], value, rtol=1e-3, atol=1e-5, msg=name)
