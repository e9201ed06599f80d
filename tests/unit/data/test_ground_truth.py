"""Real data from ../shared/datasets: the published statistics and the exact input sequences.

Skipped (with the reason) where ../shared/datasets is absent; it is not part of the project.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bloger_cli.cli import app

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def prepare_json(cli, ws: Path, *args: object) -> dict:
    result = cli("prepare", "-w", ws, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["result"]


def keyed_sequences(ws: Path) -> dict[str, list[str]]:
    """user_key -> item keys, read back through the users, items and sequences artifacts."""
    users = dict(zip(*pq.read_table(ws / "users.parquet", columns=["user_id", "user_key"]).to_pydict().values()))
    items = dict(zip(*pq.read_table(ws / "items.parquet", columns=["item_id", "item_key"]).to_pydict().values()))
    seqs = pq.read_table(ws / "sequences.parquet", columns=["user_id", "items"]).to_pydict()
    return {users[u]: [items[i] for i in s] for u, s in zip(seqs["user_id"], seqs["items"])}


def check_letter_identity(ws: Path, inter_path: Path) -> None:
    """Every user's prepared sequence equals its input list, and the ids are the input's own numbers."""
    expected = {u: [str(i) for i in items] for u, items in json.loads(inter_path.read_text()).items()}
    assert keyed_sequences(ws) == expected
    # LETTER ids are dense 0-based numbers: numeric re-indexing keeps them as they are
    users = pq.read_table(ws / "users.parquet").to_pydict()
    items = pq.read_table(ws / "items.parquet", columns=["item_id", "item_key"]).to_pydict()
    assert users["user_key"] == [str(u) for u in users["user_id"]]
    assert items["item_key"] == [str(i) for i in items["item_id"]]


@pytest.fixture(scope="module")
def beauty(tmp_path_factory, dataset) -> tuple[Path, dict, Path]:
    folder = dataset("beauty")
    ws = tmp_path_factory.mktemp("beauty") / "ws"
    result = CliRunner().invoke(app, ["prepare", "-w", str(ws), "--source", "letter",
                                      "--input", str(folder / "Beauty.inter.json"),
                                      "--items", str(folder / "Beauty.item.recbole.json"), "--json"])
    assert result.exit_code == 0, result.output
    return ws, json.loads(result.stdout)["result"], folder


def test_beauty_statistics(beauty):
    _, r, _ = beauty
    assert (r["users"], r["items"], r["interactions"]) == (22_363, 12_101, 198_502)
    assert all(s["removed"] == 0 for s in r["steps"])  # the file is already a 5-core without repeats
    assert r["min_sequence_length"] == 5
    assert r["samples"] == {"train": 198_502 - 3 * 22_363, "valid": 22_363, "test": 22_363}
    assert r["text_fields"] == ["asin", "title", "brand", "categories", "price", "sales_type", "sales_rank"]


def test_beauty_sequences_are_the_input(beauty):
    ws, _, folder = beauty
    check_letter_identity(ws, folder / "Beauty.inter.json")


def test_beauty_item_text(beauty):
    ws, r, _ = beauty
    items = pq.read_table(ws / "items.parquet", columns=["item_id", "item_key", "asin", "title", "categories"])
    first = items.slice(0, 1).to_pylist()[0]
    assert (first["item_id"], first["item_key"], first["asin"]) == (0, "0", "B004756YJA")
    assert first["title"].startswith("OPI Nail Lacquer")
    assert first["categories"] == "Beauty, Makeup, Nails, Nail Polish"
    last = items.slice(12_100, 1).to_pylist()[0]
    assert (last["item_id"], last["asin"]) == (12_100, "B00IC8JBIE")
    assert last["title"].startswith("Best Anti Aging Facial Creme")
    assert r["items_without_text"] == 0


def test_beauty_interaction_counts_match_the_input(beauty):
    ws, _, folder = beauty
    inter = json.loads((folder / "Beauty.inter.json").read_text())
    counts = Counter(str(i) for items in inter.values() for i in items)
    items = pq.read_table(ws / "items.parquet", columns=["item_key", "n_interactions"]).to_pydict()
    assert dict(zip(items["item_key"], items["n_interactions"])) == counts


def test_instruments(cli, dataset, tmp_path):
    path = dataset("instruments") / "Instruments.inter.json"
    r = prepare_json(cli, tmp_path / "ws", "--source", "letter", "--input", path)
    assert (r["users"], r["items"], r["interactions"]) == (24_772, 9_922, 206_153)
    assert r["notes"] == ["no item metadata file: items have no text"]
    check_letter_identity(tmp_path / "ws", path)


def test_ml100k_everything(cli, dataset, tmp_path):
    folder = dataset("ml-100k")
    r = prepare_json(cli, tmp_path / "ws", "--source", "recbole", "--input", folder,
                     "--min-user-interactions", "1", "--min-item-interactions", "1")
    assert (r["users"], r["items"], r["interactions"]) == (943, 1_682, 100_000)
    assert r["text_fields"] == ["movie_title", "release_year", "class"] and r["items_without_text"] == 0
    items = pq.read_table(tmp_path / "ws" / "items.parquet").slice(0, 1).to_pylist()[0]
    assert (items["item_key"], items["movie_title"], items["release_year"]) == ("1", "Toy Story", "1995")
    # chronological: every user's ts list is sorted
    ts = pq.read_table(tmp_path / "ws" / "sequences.parquet", columns=["ts"]).column("ts").to_pylist()
    assert all(t == sorted(t) for t in ts)


def test_ml100k_default_5_core(cli, dataset, tmp_path):
    """The default 5-core drops 333 items rated fewer than 5 times (713 ratings); every user stays.
    Cross-checked with a plain-Python iterated 5-core over ml-100k.inter (943 / 1,349 / 99,287)."""
    folder = dataset("ml-100k")
    r = prepare_json(cli, tmp_path / "ws", "--source", "recbole", "--input", folder)
    assert (r["users"], r["items"], r["interactions"]) == (943, 1_349, 99_287)
    assert r["steps"][-1] == {"step": "k-core (users >= 5, items >= 5)", "removed": 713, "remaining": 99_287}


def test_absent_dataset_skips_with_the_reason(dataset):
    with pytest.raises(pytest.skip.Exception) as exc:
        dataset("no-such-dataset")
    assert str(exc.value) == "../shared/datasets/no-such-dataset not found: real-data ground truth skipped"
