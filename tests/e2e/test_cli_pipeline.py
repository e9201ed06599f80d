"""Every stage built so far through the installed console script, on a small synthetic catalog:
prepare -> embed (real MiniLM) -> tokenize -> export-ids, then status, a re-run and a compare."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest

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
    assert [(s["stage"], s["state"]) for s in status] == [
        ("prepare", "done"), ("embed", "done"), ("tokenize", "done")]

    again = as_json(bloger("tokenize", "-w", ws, *TOKENIZE, "--json", cwd=tmp_path))
    assert again["skipped"] and again["result"]["collision_rate"] == tok["collision_rate"]

    # a retrain with another seed: same items, IDs compared with the first export
    as_json(bloger("tokenize", "-w", ws, *TOKENIZE[:-1], "8", "--json", cwd=tmp_path))
    cmp = as_json(bloger("export-ids", "-w", ws, "--out", tmp_path / "ids2.parquet", "--compare", out,
                         "--json", cwd=tmp_path))["result"]
    assert cmp["compare_common"] == n_items and cmp["compare_added"] == cmp["compare_removed"] == 0
