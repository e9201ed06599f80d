"""Every stage through the installed console script, on a small synthetic catalog: prepare -> embed
(real MiniLM) -> tokenize -> export-ids, status, a re-run and a compare, then train-bilevel --mode fixed
-> evaluate -> export-ids --from train."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL
from test_cli_prepare import as_json, bloger

pytestmark = pytest.mark.slow

SYNTH = ["--source", "synthetic", "--set", "synthetic.users=120", "--set", "synthetic.items=80",
         "--set", "synthetic.categories=8", "--set", "synthetic.interactions=1200"]
TOKENIZE = ["--levels", "3", "--codebook-size", "8", "--epochs", "100", "--seed", "7"]


def test_prepare_embed_tokenize_export(tmp_path):
    ws = tmp_path / "ws"
    prep = as_json(bloger("prepare", "-w", ws, *SYNTH, "--json", cwd=tmp_path))["result"]
    n_items = prep["items"]
    assert n_items > 16 and prep["items_without_text"] == 0

    emb = as_json(bloger("embed", "-w", ws, "--json", cwd=tmp_path))["result"]
    assert (emb["embedded"], emb["dim"], emb["newly_encoded"] > 0) == (n_items, 384, True)
    vectors = pq.read_table(ws / "embeddings.parquet")
    assert vectors.num_rows == n_items and vectors.schema.field("embedding").type.list_size == 384

    tok = as_json(bloger("tokenize", "-w", ws, *TOKENIZE, "--json", cwd=tmp_path))["result"]
    assert (tok["items"], tok["levels"], tok["codebook_size"], tok["id_length"]) == (n_items, 3, 8, 4)
    assert 0.0 <= tok["collision_rate"] <= 1.0 and len(tok["level_stats"]) == 3
    codes = pq.read_table(ws / "semantic_ids.parquet").column("codes").to_pylist()
    assert len(codes) == n_items and len({tuple(c) for c in codes}) == n_items  # one-to-one
    assert all(0 <= c < 8 for row in codes for c in row[:3])

    out = tmp_path / "ids.csv"
    exp = as_json(bloger("export-ids", "-w", ws, "--out", out, "--json", cwd=tmp_path))["result"]
    assert exp["rows"] == n_items
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_items and rows[0]["semantic_id"] == "-".join(map(str, codes[0]))

    status = as_json(bloger("status", "-w", ws, "--json", cwd=tmp_path))["stages"]
    assert [(s["stage"], s["state"]) for s in status][:3] == [
        ("prepare", "done"), ("embed", "done"), ("tokenize", "done")]
    assert {s["stage"]: s["state"] for s in status}["train-bilevel"] == "missing"

    again = as_json(bloger("tokenize", "-w", ws, *TOKENIZE, "--json", cwd=tmp_path))
    assert again["skipped"] and again["result"]["collision_rate"] == tok["collision_rate"]

    # a retrain with another seed: same items, IDs compared with the first export
    as_json(bloger("tokenize", "-w", ws, *TOKENIZE[:-1], "8", "--json", cwd=tmp_path))
    cmp = as_json(bloger("export-ids", "-w", ws, "--out", tmp_path / "ids2.parquet", "--compare", out,
                         "--json", cwd=tmp_path))["result"]
    assert cmp["compare_common"] == n_items and cmp["compare_added"] == cmp["compare_removed"] == 0

    # the recommender on the retrained IDs, then its evaluation and the IDs it was trained on
    train = as_json(bloger("train-bilevel", "-w", ws, "--mode", "fixed", "--epochs", "3", "--batch-size", "32",
                           *TINY_MODEL, "--json", cwd=tmp_path))["result"]
    assert (train["epochs_run"], train["device"], train["mode"]) == (3, "cpu", "fixed")
    history = pq.read_table(ws / "history.parquet").to_pylist()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert (ws / "best.pt").is_file() and (ws / "last.pt").is_file() and not (ws / "training").exists()

    ev = as_json(bloger("evaluate", "-w", ws, "--k", "5,10", "--json", cwd=tmp_path))
    assert set(ev["metrics"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert all(0.0 <= v <= 1.0 for v in ev["metrics"].values())
    assert ev["metrics"]["recall@5"] <= ev["metrics"]["recall@10"]
    assert ev["result"]["users"] == prep["users"]
    metrics = pq.read_table(ws / "metrics.parquet").to_pylist()
    assert {r["method"] for r in metrics} == {"model", "popularity"} and len(metrics) == 8
    assert {r["n_users"] for r in metrics} == {prep["users"]}

    trained = tmp_path / "trained.parquet"
    exp = as_json(bloger("export-ids", "-w", ws, "--from", "train", "--out", trained, "--json", cwd=tmp_path))
    assert exp["result"]["rows"] == n_items
    # mode fixed leaves the tokenizer, hence the IDs, as tokenize wrote them
    assert pq.read_table(trained).column("semantic_id").to_pylist() == \
        pq.read_table(tmp_path / "ids2.parquet").column("semantic_id").to_pylist()
