"""Interruptions: Ctrl-C (SIGINT) stops at a safe point, saves last.pt mid-epoch and says how to resume;
SIGKILL loses at most the epoch in progress; either way `--resume` ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_MODEL

from bloger_cli.errors import Interrupted
from bloger_cli.stages import train
from bloger_cli.training.checkpoint import in_progress_dir, load_checkpoint
from bloger_cli.workspace import Workspace


def _same_training(one: Path, two: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(one / name), load_checkpoint(two / name)
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        for key, value in a["model"].items():
            assert torch.equal(b["model"][key], value), key
        assert torch.equal(a["codes"], b["codes"])
    losses = [[r["train_loss"] for r in pq.read_table(ws / "history.parquet").to_pylist() if r["event"] == "epoch"]
              for ws in (one, two)]
    assert losses[0] == losses[1]


@contextlib.contextmanager
def _stop_after(calls: int):
    """In place of stop_on_sigint: 'stop' turns true at the given call, as if Ctrl-C came then."""
    seen = [0]

    def stop() -> bool:
        seen[0] += 1
        return seen[0] >= calls

    yield stop


@pytest.mark.parametrize("mode", ["fixed", "bilevel"])
def test_a_stop_mid_epoch_saves_and_resumes_to_the_same_result(mode: str, rqvae_workspace: Path, tmp_path: Path,
                                                                train_config, monkeypatch) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(rqvae_workspace, reference)
    cfg = train_config(mode=mode, epochs=3, batch_size=16,
                       bilevel={"updates_per_epoch": 2, "tokenizer_lr": 0.05})
    train.run(cfg, Workspace(reference))
    with monkeypatch.context() as patch:
        patch.setattr(train, "stop_on_sigint", lambda enabled: _stop_after(5))
        with pytest.raises(Interrupted, match=r"at epoch \d, step \d+ of 3; the state is saved in") as info:
            train.run(cfg, Workspace(rqvae_workspace))
    assert "--resume" in info.value.hint
    saved = load_checkpoint(in_progress_dir(rqvae_workspace) / "last.pt")
    assert saved["epoch_step"] > 0  # mid-epoch
    runs = Workspace(rqvae_workspace).catalog.runs("train-bilevel")
    assert runs[0].status == "interrupted"
    train.run(cfg, Workspace(rqvae_workspace), resume=True)
    _same_training(reference, rqvae_workspace)


OPTIONS = ["--mode", "fixed", *TINY_MODEL, "--set", "device=cpu", "--set", "epochs=8", "--set", "batch_size=8",
           "--set", "train.val_users=20", "--set", "train.patience=none"]


def _start(workspace: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "bloger_cli", "train-bilevel", "-w", str(workspace), *OPTIONS,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _after_first_epoch(proc: subprocess.Popen, workspace: Path) -> None:
    last = in_progress_dir(workspace) / "last.pt"
    deadline = time.monotonic() + 120
    while not last.is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no epoch finished in 120 s"
        time.sleep(0.01)
    time.sleep(0.1)  # into the second epoch


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_a_signalled_run_resumes_to_the_same_result(sig: int, tokenized_workspace: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(tokenized_workspace, reference)
    done = _start(reference)  # a process like the interrupted one: the same threads, the same sums
    assert done.communicate(timeout=300) and done.returncode == 0

    proc = _start(tokenized_workspace)
    _after_first_epoch(proc, tokenized_workspace)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "stopped:" in stderr and "--resume" in stderr and "Traceback" not in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (tokenized_workspace / "last.pt").exists()  # the run did not finish
    resumed = _start(tokenized_workspace, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    _same_training(reference, tokenized_workspace)
