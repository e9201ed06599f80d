"""examples/cron/retrain.sh run twice, as a scheduler would, with new items arriving in between: the
second run reuses the cached embeddings, starts from the first run's tokenizer and model, covers the
new items and reports the share of items whose IDs changed, and each run ends with every user's
recommendations; a run that finds the lock taken exits 75."""

from __future__ import annotations

import csv
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bloger_cli.workspace import Workspace

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "cron" / "retrain.sh"
CONFIG = """
[prepare]
source = "table"
input = "{raw}/interactions.csv"
items = "{raw}/items.csv"
user_col = "user"
item_col = "item"
time_col = "ts"
item_key_col = "item"

[embed]
template = "{{title}}"

[tokenize]
levels = 2
codebook_size = 16
code_dim = 8
epochs = 20
seed = 1

[train-bilevel]
mode = "bilevel"
epochs = 2
batch_size = 64
device = "cpu"

[train-bilevel.model]
d_model = 16
num_layers = 1
num_heads = 2
d_kv = 8
d_ff = 32
dropout = 0.0

[train-bilevel.train]
val_users = 50

[evaluate]
beam = 10
k = [5, 10]
"""


def write_day(raw: Path, items: range, users: range, start: int, rng: np.random.Generator) -> None:
    """Append each user's 8 interactions among `items` (category-coherent) and the items' titles."""
    raw.mkdir(exist_ok=True)
    colours = ["red", "blue", "green", "black"]
    kinds = ["shoe", "lamp", "mug", "shirt", "book"]
    new_items = not (raw / "items.csv").exists()
    with open(raw / "items.csv", "a", newline="") as fh:
        out = csv.writer(fh)
        if new_items:
            out.writerow(["item", "title"])
        for i in items:
            if i >= start:
                out.writerow([f"i{i}", f"{colours[i % 4]} {kinds[i % 5]} number {i}"])
    fresh = not (raw / "interactions.csv").exists()
    with open(raw / "interactions.csv", "a", newline="") as fh:
        out = csv.writer(fh)
        if fresh:
            out.writerow(["user", "item", "ts"])
        pool = np.array(list(items))
        for u in users:
            picks = rng.choice(pool, size=8, replace=False)
            for t, i in enumerate(picks):
                out.writerow([f"u{u}", f"i{i}", 1000 * start + t])


def run(config: Path, ws: Path, log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("BLOGER_WORKSPACE", None)
    return subprocess.run(["bash", str(SCRIPT), str(config), str(ws), str(log)], capture_output=True, text=True,
                          env=env, timeout=600)


def last_result(ws: Path, stage: str) -> tuple[dict, dict]:
    record = Workspace(ws).catalog.last_done(stage)
    assert record is not None, stage
    return record.config, record.result


def test_retraining_twice_with_new_items(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw, ws, log = tmp_path / "raw", tmp_path / "work", tmp_path / "logs" / "retrain.log"
    config = tmp_path / "retrain.toml"
    config.write_text(CONFIG.format(raw=raw))
    write_day(raw, range(0, 40), range(0, 120), 0, rng)
    first = run(config, ws, log)
    assert first.returncode == 0, first.stderr + log.read_text()[-3000:]
    assert first.stderr == ""
    first_items = last_result(ws, "embed")[1]["embedded"]
    assert not (ws / "previous").exists()  # nothing to warm-start from
    check_recommendations(ws)

    write_day(raw, range(0, 50), range(100, 200), 40, rng)  # 10 new items, 80 new users
    second = run(config, ws, log)
    assert second.returncode == 0, second.stderr + log.read_text()[-3000:]

    embed = last_result(ws, "embed")[1]
    assert embed["embedded"] == first_items + 10 and embed["newly_encoded"] == 10  # the cache served the rest
    tok_config, _ = last_result(ws, "tokenize")
    train_config, _ = last_result(ws, "train-bilevel")
    assert Path(tok_config["warm_start"]) == Path(train_config["warm_start"]) == ws / "previous"
    ids = pq.read_table(ws / "ids.parquet")
    assert ids.num_rows == pq.read_table(ws / "items.parquet").num_rows == first_items + 10
    _, export = last_result(ws, "export-ids")
    assert export["compare_common"] == first_items and export["compare_added"] == 10
    assert 0.0 <= export["compare_changed_share"] <= 1.0
    check_recommendations(ws)  # the 80 new users too
    text = log.read_text()
    assert text.count("=== ") == 4 and text.count(" done\n") == 2  # two runs, each start and end logged


def check_recommendations(ws: Path) -> None:
    """WORKSPACE/recommendations.parquet: 10 items for every user of the workspace, none already seen."""
    recs = pq.read_table(ws / "recommendations.parquet").to_pylist()
    users = pq.read_table(ws / "users.parquet").sort_by("user_id").column("user_key").to_pylist()
    items = pq.read_table(ws / "items.parquet").sort_by("item_id").column("item_key").to_pylist()
    assert len(recs) == 10 * len(users) and {r["user_key"] for r in recs} == set(users)
    seen = {(users[row["user_id"]], items[i]) for row in pq.read_table(ws / "sequences.parquet").to_pylist()
            for i in row["items"]}
    assert not {(r["user_key"], r["item_key"]) for r in recs} & seen


def test_a_second_job_while_one_runs_exits_75(tmp_path: Path) -> None:
    ws = tmp_path / "work"
    ws.mkdir()
    with open(f"{ws}.retrain.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = run(tmp_path / "missing.toml", ws, tmp_path / "log")
    assert done.returncode == 75 and "another job" in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_failing_stage_gives_its_exit_code_and_one_line(tmp_path: Path) -> None:
    config = tmp_path / "retrain.toml"
    config.write_text(CONFIG.format(raw=tmp_path / "nothing-here"))
    done = run(config, tmp_path / "work", tmp_path / "log")
    assert done.returncode == 1 and done.stderr.startswith("retrain: bloger prepare failed with exit code 1")
    assert len(done.stderr.splitlines()) == 1 and "error:" in (tmp_path / "log").read_text()
