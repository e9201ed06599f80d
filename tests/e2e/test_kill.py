"""Kill -9 anywhere: a stage killed at a named point of its commit, or at a random moment, leaves a
workspace whose outputs are all from one run, a `bloger status` that says what was left, a
`status --repair` that fixes it, and a re-run that completes (bloger_cli/journal.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bloger_cli.artifacts import SPECS, file_hash, read_info
from bloger_cli.journal import JOURNAL
from bloger_cli.status import problems
from bloger_cli.workspace import Workspace

BLOGER = [sys.executable, "-m", "bloger_cli"]
TOKENIZE = ["tokenize", "--method", "rq-kmeans", "--levels", "2", "--codebook-size", "16", "--device", "cpu",
            "--force"]
TOKENIZE_OUTPUTS = ("semantic_ids", "codebook_stats", "tokenizer")


def bloger(*args: object, fault: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"BLOGER_FAULT": fault} if fault else {})}
    env.pop("BLOGER_WORKSPACE", None)
    return subprocess.run([*BLOGER, *map(str, args)], capture_output=True, text=True, env=env, timeout=300,
                          **kwargs)


def consistent(root: Path) -> None:
    """Every current artifact's file is what the catalog says, lineage fits, and nothing is left over."""
    ws = Workspace(root)
    assert not (root / JOURNAL).exists()
    assert problems(ws) == []
    current = ws.catalog.current_artifacts()
    for kind, row in current.items():
        assert file_hash(root / row["path"]) == row["content_hash"], kind
    ws.inputs(*[k for k in current if k in SPECS and not SPECS[k].per_run])  # lineage checks pass


def tokenize_hashes(root: Path) -> set[str]:
    """The config hashes the tokenize outputs were made with: one element when they are from one run."""
    return {read_info(root / SPECS[k].filename, SPECS[k]).config_hash for k in TOKENIZE_OUTPUTS}


@pytest.mark.parametrize("point", ["commit:before-journal", "commit:after-journal", "commit:after-first-rename",
                                   "commit:before-catalog", "commit:before-clear"])
def test_a_kill_during_the_switch_leaves_one_run_and_repair_finishes_it(point: str, tokenized_workspace: Path) -> None:
    ws = tokenized_workspace
    old = tokenize_hashes(ws)
    assert len(old) == 1
    killed = bloger(*TOKENIZE, "-w", ws, "--seed", "7", "--set", "kmeans_iters=3", fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    decided = point != "commit:before-journal"
    status = json.loads(bloger("status", "-w", ws, "--json").stdout)
    assert status["problems"], "status must say what the kill left"
    if decided and point != "commit:before-clear":
        assert any("stopped while switching in its outputs" in p for p in status["problems"])
    if not decided:
        assert any("marked running" in p for p in status["problems"])
        assert tokenize_hashes(ws) == old  # nothing switched: the earlier outputs, untouched

    repaired = json.loads(bloger("status", "-w", ws, "--repair", "--json").stdout)
    assert repaired["repaired"] and repaired["problems"] == []
    consistent(ws)
    hashes = tokenize_hashes(ws)
    assert len(hashes) == 1 and (hashes != old) == decided  # a decided commit is finished, else none of it
    again = bloger(*TOKENIZE, "-w", ws, "--seed", "7", "--set", "kmeans_iters=3")
    assert again.returncode == 0, again.stderr
    consistent(ws)


def test_the_next_stage_finishes_a_half_done_switch_by_itself(tokenized_workspace: Path) -> None:
    ws = tokenized_workspace
    killed = bloger(*TOKENIZE, "-w", ws, "--seed", "7", fault="commit:after-first-rename")
    assert killed.returncode == -signal.SIGKILL
    train = bloger("train-bilevel", "-w", ws, "--mode", "fixed", "--epochs", "1", "--device", "cpu",
                   "--set", "model.d_model=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
                   "--set", "model.d_kv=8", "--set", "model.d_ff=32")
    assert train.returncode == 0, train.stderr
    assert "stopped while switching them in" in train.stderr
    consistent(ws)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment_of_any_stage(seed: int, tokenized_workspace: Path, tmp_path: Path) -> None:
    """A real SIGKILL at a random time of tokenize, train-bilevel or evaluate; then the truth, a repair
    and a complete re-run."""
    rng = random.Random(seed)
    ws = tmp_path / "ws"
    shutil.copytree(tokenized_workspace, ws)
    tiny = ["--set", "model.d_model=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
            "--set", "model.d_kv=8", "--set", "model.d_ff=32"]
    stages = [[*TOKENIZE, "--seed", str(seed)], ["train-bilevel", "--mode", "fixed", "--epochs", "2", "--device",
                                                   "cpu", *tiny], ["evaluate", "--device", "cpu"]]
    assert bloger(*stages[1], "-w", ws).returncode == 0  # something to evaluate and to keep intact
    for args in stages:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([*BLOGER, *args, "-w", str(ws), "--force"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.5, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        status = bloger("status", "-w", ws, "--json")
        assert status.returncode == 0, status.stderr  # readable whatever the moment
        assert bloger("status", "-w", ws, "--repair").returncode == 0
        consistent(ws)
        done = bloger(*args, "-w", ws, "--force")
        assert done.returncode == 0, done.stderr
        consistent(ws)
