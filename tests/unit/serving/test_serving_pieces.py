"""The pieces of `bloger recommend`: dropping seen items, the last H items of a history, new histories
mapped to item ids, and the output written whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bloger_cli.errors import ConfigError
from bloger_cli.serving.output import RowWriter, check_output
from bloger_cli.serving.requests import _last, new_histories
from bloger_cli.stages.recommend import drop_seen


def test_drop_seen_keeps_the_unseen_in_rank_order() -> None:
    items = torch.tensor([[4, 2, 7, 1, -1], [3, 0, 5, 6, 2]])  # (B=2, W=5) best first, -1 an empty slot
    scores = -torch.arange(10.0).view(2, 5)
    seen = pa.array([[2, 9], [3, 6, 0]], pa.list_(pa.int64()))
    kept, kept_scores = drop_seen(items, scores, seen, num_items=10)
    assert kept.tolist() == [[4, 7, 1, -1, -1], [5, 2, -1, -1, -1]]
    assert kept_scores[0, :3].tolist() == [0.0, -2.0, -3.0] and kept_scores[1, :2].tolist() == [-7.0, -9.0]
    assert all(math.isnan(s) for s in kept_scores[1, 2:].tolist())


def test_last_items_of_each_history() -> None:
    lists = pa.array([[1, 2, 3, 4], [], [5]], pa.list_(pa.int64()))
    assert _last(lists, 3).tolist() == [[2, 3, 4], [-1, -1, -1], [5, -1, -1]]
    assert _last(lists.slice(1), 2).tolist() == [[-1, -1], [5, -1]]  # a slice keeps its own offsets


def test_new_histories_map_raw_keys_and_drop_unknown_ones(tmp_path: Path, caplog) -> None:
    path = tmp_path / "h.jsonl"
    rows = [{"user_key": 7, "items": [10, 11, 99]}, {"user_key": "b", "items": ["x"]}, {"user_key": "c", "items": [12]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    requests = new_histories(path, pa.array(["10", "11", "12"]), max_history=2)
    assert requests.user_keys.to_pylist() == ["7", "b", "c"]  # keys as text, whatever the file's type
    assert requests.history.tolist() == [[0, 1], [-1, -1], [2, -1]]
    assert requests.seen.to_pylist() == [[0, 1], [], [2]]
    assert requests.notes == {"unknown_items": 2, "history_items": 5, "popularity_users": 1}
    assert "2 of 5 item keys are not items of the model" in caplog.text


def test_writer_renames_only_a_complete_file(tmp_path: Path) -> None:
    schema = pa.schema([("user_key", pa.string()), ("rank", pa.int32())])
    out = tmp_path / "r.parquet"
    with RowWriter(out, "parquet", schema) as writer:
        for start in range(3):
            writer.write(pa.table({"user_key": ["u"], "rank": [start + 1]}))
    assert pq.read_table(out).column("rank").to_pylist() == [1, 2, 3] and writer.rows == 3
    with pytest.raises(RuntimeError):
        with RowWriter(out, "parquet", schema) as writer:
            writer.write(pa.table({"user_key": ["v"], "rank": [9]}))
            raise RuntimeError("killed mid-way")
    assert pq.read_table(out).column("rank").to_pylist() == [1, 2, 3]  # the old file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]  # no temporary file left


def test_output_suffix_must_name_a_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        check_output(tmp_path / "r.txt", force=False)
    assert str(caught.value) == (f"--out {tmp_path / 'r.txt'}: cannot tell the format from suffix '.txt'; "
                                 "end the name in .parquet, .csv or .jsonl")
