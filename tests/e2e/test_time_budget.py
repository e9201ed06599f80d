"""A time-budgeted training run on the quickstart data ends within its budget plus one validation, with
a usable best.pt, and its schedule spans the budget."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT
from test_cli_prepare import as_json, bloger

pytestmark = pytest.mark.slow
QUICK = REPO_ROOT / "examples" / "quickstart.toml"


def test_one_minute_budget_on_the_quickstart_ends_within_a_minute_and_one_validation(tmp_path):
    ws = tmp_path / "ws"
    for stage in ("prepare", "embed", "tokenize"):
        as_json(bloger(stage, "-c", QUICK, "-w", ws, "--json", cwd=tmp_path))
    started = time.perf_counter()
    out = as_json(bloger("train-bilevel", "-c", QUICK, "-w", ws, "--time-budget", "1m", "--epochs", "1000",
                         "--set", "train.patience=1000", "--json", cwd=tmp_path))["result"]
    wall = time.perf_counter() - started
    history = pq.read_table(ws / "history.parquet").to_pylist()
    validations = [r for r in history if r["val_ndcg_10"] is not None]
    assert validations and (ws / "best.pt").is_file()
    last_validation = 30.0  # 300 validation users, beam 20, tiny model: a few seconds on 2 cores; generous
    assert 60.0 <= out["elapsed"] <= 60.0 + last_validation, out
    assert wall <= 60.0 + last_validation + 30.0  # + process start, reading inputs, writing artifacts
    from bloger_cli.training.checkpoint import load_checkpoint

    final_lr = load_checkpoint(ws / "last.pt")["scheduler"]["_last_lr"][0]
    assert final_lr < 0.05 * 2e-3  # quickstart lr 2e-3: the cosine reached ~0 at the minute, not at epoch 1000
