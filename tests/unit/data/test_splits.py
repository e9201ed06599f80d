"""Leave-one-out as SQL: a hand-computed case, the < 3 items rule, and a property against a Python reference."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bloger_cli.data.splits import MIN_SEQUENCE, sample_counts, split_query

# user -> items in time order
SEQUENCES = {0: [10, 11, 12, 13, 14], 1: [20, 21, 22], 2: [30, 31], 3: [40], 4: [50, 51, 52, 53]}


def connect(sequences: dict[int, list[int]]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register("seq", pa.table({
        "user_id": pa.array(list(sequences), pa.int32()),
        "items": pa.array(list(sequences.values()), pa.list_(pa.int32())),
    }))
    return con


def rows(con, split, max_history):
    return [(u, list(h), t) for u, h, t in con.execute(split_query("seq", split, max_history)).fetchall()]


def test_hand_computed_max_history_2():
    con = connect(SEQUENCES)
    assert rows(con, "train", 2) == [
        (0, [10], 11), (0, [10, 11], 12),
        (4, [50], 51),
    ]
    assert rows(con, "valid", 2) == [(0, [11, 12], 13), (1, [20], 21), (4, [50, 51], 52)]
    assert rows(con, "test", 2) == [(0, [12, 13], 14), (1, [20, 21], 22), (4, [51, 52], 53)]


def test_history_of_one():
    con = connect({7: [1, 2, 3, 4]})
    assert rows(con, "train", 1) == [(7, [1], 2)]
    assert rows(con, "valid", 1) == [(7, [2], 3)]
    assert rows(con, "test", 1) == [(7, [3], 4)]


def test_users_with_fewer_than_three_items_are_excluded():
    assert MIN_SEQUENCE == 3
    con = connect({2: [30, 31], 3: [40], 5: []})
    for split in ("train", "valid", "test"):
        assert rows(con, split, 20) == []


def test_sample_counts_match_hand_computed_rows():
    con = connect(SEQUENCES)
    lengths = "(SELECT len(items) AS n FROM seq)"
    assert con.execute(sample_counts(lengths)).fetchone() == (3, 3, 3)


def reference(sequences: dict[int, list[int]], split: str, max_history: int):
    """The protocol in plain Python: targets s_2..s_{n-2} train, s_{n-1} valid, s_n test."""
    out = []
    for user, items in sorted(sequences.items()):
        n = len(items)
        if n < MIN_SEQUENCE:
            continue
        targets = {"train": range(1, n - 2), "valid": [n - 2], "test": [n - 1]}[split]  # 0-based target index
        for t in targets:
            out.append((user, items[max(0, t - max_history):t], items[t]))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), max_size=12), max_size=8), st.integers(1, 6))
def test_splits_match_the_reference_and_the_counts(lists, max_history):
    sequences = dict(enumerate(lists))
    con = connect(sequences)
    counts = {}
    for split in ("train", "valid", "test"):
        got = rows(con, split, max_history)
        assert got == reference(sequences, split, max_history)
        assert all(1 <= len(h) <= max_history for _, h, _ in got)
        counts[split] = len(got)
    expected = con.execute(sample_counts("(SELECT len(items) AS n FROM seq)")).fetchone()
    # sum() over no rows is NULL
    assert (expected[0] or 0, expected[1], expected[2]) == (counts["train"], counts["valid"], counts["test"])


@pytest.mark.parametrize("n", [3, 4, 5, 30])
def test_every_item_after_the_first_is_a_target_exactly_once(n):
    items = list(range(100, 100 + n))
    con = connect({0: items})
    targets = [t for split in ("train", "valid", "test") for _, _, t in rows(con, split, 20)]
    assert targets == items[1:]
