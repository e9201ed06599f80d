"""`prepare` on tiny hand-made data: every filter step, re-indexing, chronology, item text and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bloger_cli.config import PrepareConfig
from bloger_cli.errors import ConfigError, DataError
from bloger_cli.stages import prepare
from bloger_cli.workspace import Workspace

LOOSE = {"min_user_interactions": 1, "min_item_interactions": 1}


def run(tmp_path: Path, **cfg) -> tuple[dict, dict[str, list[dict]]]:
    """Prepare into a fresh workspace; returns the summary and every artifact's rows."""
    ws = Workspace(tmp_path / "ws")
    out = prepare.run(PrepareConfig(**cfg), ws, force=True)
    tables = {kind: pq.read_table(ws.path(kind)).to_pylist()
              for kind in ("interactions", "users", "items", "sequences")}
    return out.result, tables


def keyed_sequences(tables) -> dict[str, list[str]]:
    """user_key -> item keys in the order of the sequences artifact."""
    users = {r["user_id"]: r["user_key"] for r in tables["users"]}
    items = {r["item_id"]: r["item_key"] for r in tables["items"]}
    return {users[r["user_id"]]: [items[i] for i in r["items"]] for r in tables["sequences"]}


def removed(summary) -> dict[str, int]:
    return {s["step"]: s["removed"] for s in summary["steps"]}


# ----------------------------------------------------------------------------------- the tiny letter set


def test_tiny_letter_artifacts(tmp_path, tiny_letter):
    summary, t = run(tmp_path, input=tiny_letter, **LOOSE)
    # item keys 2, 3, 4, 5, 10 -> ids 0..4 in numeric order; users 0, 1, 2 keep their order
    assert t["users"] == [{"user_id": 0, "user_key": "0", "n_interactions": 4},
                          {"user_id": 1, "user_key": "1", "n_interactions": 5},
                          {"user_id": 2, "user_key": "2", "n_interactions": 3}]
    assert [(r["item_id"], r["item_key"], r["n_interactions"]) for r in t["items"]] == [
        (0, "2", 3), (1, "3", 3), (2, "4", 2), (3, "5", 1), (4, "10", 3)]
    assert t["sequences"] == [
        {"user_id": 0, "items": [4, 0, 1, 2], "ts": [0, 1, 2, 3]},
        {"user_id": 1, "items": [0, 1, 2, 4, 3], "ts": [0, 1, 2, 3, 4]},
        {"user_id": 2, "items": [1, 0, 4], "ts": [0, 1, 2]},
    ]
    # interactions: by user, then time; ts is the position in the user's list
    assert [(r["user_id"], r["item_id"], r["ts"]) for r in t["interactions"]] == [
        (0, 4, 0), (0, 0, 1), (0, 1, 2), (0, 2, 3),
        (1, 0, 0), (1, 1, 1), (1, 2, 2), (1, 4, 3), (1, 3, 4),
        (2, 1, 0), (2, 0, 1), (2, 4, 2)]


def test_tiny_letter_item_text(tmp_path, tiny_letter):
    _, t = run(tmp_path, input=tiny_letter, **LOOSE)
    assert list(t["items"][0]) == ["item_id", "item_key", "n_interactions", "title", "brand", "categories"]
    text = {r["item_key"]: (r["title"], r["brand"], r["categories"]) for r in t["items"]}
    assert text == {
        "2": ("Two", "B", "Beauty, Nails, Polish"),  # nested lists flattened, joined with ", "
        "3": ("Three", None, None),  # empty string -> missing
        "4": (None, None, None), "5": (None, None, None),  # no metadata
        "10": ("Ten", None, None),
    }  # item 99 has text but no interactions: not an item


def test_tiny_letter_summary(tmp_path, tiny_letter):
    summary, _ = run(tmp_path, input=tiny_letter, **LOOSE)
    assert summary == {
        "source": "letter", "users": 3, "items": 5, "interactions": 12,
        "sparsity": pytest.approx(1 - 12 / 15),
        "avg_sequence_length": 4.0, "median_sequence_length": 4.0,
        "min_sequence_length": 3, "max_sequence_length": 5,
        "samples": {"train": 1 + 2 + 0, "valid": 3, "test": 3},
        "max_history": 20,
        "text_fields": ["title", "brand", "categories"], "items_without_text": 2,
        "steps": [
            {"step": "missing user or item key", "removed": 0, "remaining": 12},
            {"step": "repeated (user, item): kept the first", "removed": 0, "remaining": 12},
            {"step": "k-core (users >= 1, items >= 1)", "removed": 0, "remaining": 12},
            {"step": "users with < 3 interactions (cannot be split)", "removed": 0, "remaining": 12},
        ],
        "notes": [],
    }


def test_artifact_metadata(tmp_path, tiny_letter):
    ws = Workspace(tmp_path / "ws")
    prepare.run(PrepareConfig(input=tiny_letter, max_history=7, **LOOSE), ws)
    info = ws.info("items")
    assert info.meta == {"source": "letter", "text_fields": ["title", "brand", "categories"], "max_history": 7,
                         "has_time": False}
    assert info.parents == {} and info.config_hash == ws.catalog.runs()[0].config_hash


def test_letter_without_item_file_notes_it(tmp_path, make_letter):
    path = make_letter({"a": [1, 2, 3]})
    summary, t = run(tmp_path, input=path, **LOOSE)
    assert summary["notes"] == ["no item metadata file: items have no text"]
    assert summary["text_fields"] == [] and summary["items_without_text"] == 3
    assert list(t["items"][0]) == ["item_id", "item_key", "n_interactions"]


def test_reserved_text_field_names_are_renamed(tmp_path, make_letter):
    path = make_letter({"a": [1, 2, 3]}, {"1": {"item_id": "x", "n_interactions": "7", "title": "t"}})
    summary, t = run(tmp_path, input=path, **LOOSE)
    assert summary["text_fields"] == ["item_id_text", "n_interactions_text", "title"]
    assert t["items"][0] == {"item_id": 0, "item_key": "1", "n_interactions": 1, "item_id_text": "x",
                             "n_interactions_text": "7", "title": "t"}


# ------------------------------------------------------------------------------------------- the filters


def test_missing_keys_are_dropped_and_counted(tmp_path, make_csv):
    path = make_csv("t.csv", """
        user,item
        u1,a
        ,b
        u1,b
        u2,
        " ",c
        u1,c
    """)
    summary, t = run(tmp_path, source="table", input=path, user_col="user", item_col="item", **LOOSE)
    assert removed(summary)["missing user or item key"] == 3
    assert keyed_sequences(t) == {"u1": ["a", "b", "c"]}


def test_min_rating(tmp_path, make_csv):
    path = make_csv("r.csv", """
        user,item,stars
        1,a,5
        1,b,4
        1,c,3.5
        1,d,
        1,e,4.0
        1,f,x
    """)
    summary, t = run(tmp_path, source="table", input=path, user_col="user", item_col="item",
                     rating_col="stars", min_rating=4, **LOOSE)
    assert removed(summary)["rating below 4"] == 3  # 3.5, missing, unparseable
    assert keyed_sequences(t) == {"1": ["a", "b", "e"]}


def test_min_rating_needs_ratings(tmp_path, tiny_letter):
    with pytest.raises(ConfigError) as exc:
        run(tmp_path, input=tiny_letter, min_rating=4, **LOOSE)
    assert str(exc.value) == ("min_rating is set (4.0) but source 'letter' has no ratings; "
                              "drop --min-rating or map --rating-col")
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize(("policy", "expected", "n_removed"), [
    ("first", ["1", "2", "3"], 2), ("all", ["1", "2", "1", "3", "2"], None),
])
def test_duplicates_letter(tmp_path, make_letter, policy, expected, n_removed):
    path = make_letter({"u": [1, 2, 1, 3, 2]})
    summary, t = run(tmp_path, input=path, duplicates=policy, **LOOSE)
    assert keyed_sequences(t) == {"u": expected}
    assert removed(summary).get("repeated (user, item): kept the first") == n_removed
    assert summary["interactions"] == len(expected)


def test_duplicates_first_means_earliest_in_time(tmp_path, make_csv):
    path = make_csv("d.csv", """
        user,item,time
        u,a,10
        u,b,5
        u,a,1
        u,c,20
    """)
    _, t = run(tmp_path, source="table", input=path, user_col="user", item_col="item", time_col="time", **LOOSE)
    assert keyed_sequences(t) == {"u": ["a", "b", "c"]}
    assert t["sequences"][0]["ts"] == [1, 5, 20]


def test_duplicates_all_count_towards_the_core(tmp_path, make_letter):
    path = make_letter({"u": [1, 1, 1], "v": [2, 3, 4]})
    _, t = run(tmp_path, input=path, duplicates="all", min_user_interactions=3, min_item_interactions=3)
    assert keyed_sequences(t) == {"u": ["1", "1", "1"]}


def test_iterative_k_core_reaches_the_fixed_point(tmp_path, make_letter):
    """users >= 3, items >= 2. Pass 1 drops items 6, 7, 8 (one interaction each); C and D fall to two
    items and go in pass 2, which leaves items 4 and 5 with no one; pass 3 changes nothing."""
    path = make_letter({"A": [1, 2, 3], "B": [1, 2, 3], "C": [4, 5, 6], "D": [4, 5, 7], "E": [1, 2, 3, 8]})
    summary, t = run(tmp_path, input=path, min_user_interactions=3, min_item_interactions=2)
    assert keyed_sequences(t) == {"A": ["1", "2", "3"], "B": ["1", "2", "3"], "E": ["1", "2", "3"]}
    assert removed(summary) == {"missing user or item key": 0, "repeated (user, item): kept the first": 0,
                                "k-core (users >= 3, items >= 2)": 16 - 9}
    assert summary["steps"][-1]["remaining"] == 9


def test_k_core_result_is_a_core(tmp_path, make_letter):
    """Every kept user and item meets its threshold in the output (not only in the first pass)."""
    inter = {f"u{u}": [(u * 7 + k * 3) % 11 for k in range(u % 6 + 1)] for u in range(40)}
    summary, t = run(tmp_path, input=make_letter(inter), min_user_interactions=4, min_item_interactions=4)
    assert min(r["n_interactions"] for r in t["users"]) >= 4
    assert min(r["n_interactions"] for r in t["items"]) >= 4


def test_users_below_three_are_dropped_even_with_lower_thresholds(tmp_path, make_letter):
    path = make_letter({"a": [1, 2, 3], "b": [1, 2], "c": [4]})
    summary, t = run(tmp_path, input=path, **LOOSE)
    assert keyed_sequences(t) == {"a": ["1", "2", "3"]}
    assert removed(summary)["users with < 3 interactions (cannot be split)"] == 3
    assert summary["items"] == 3


def test_second_user_pass_reapplies_the_item_threshold(tmp_path, make_letter):
    """min_user 1 < 3, min_item 2: dropping the 2-item user b leaves item 4 with one interaction."""
    path = make_letter({"a": [1, 2, 3, 4], "c": [1, 2, 3], "b": [4, 5], "d": [5, 1, 2]})
    summary, t = run(tmp_path, input=path, min_user_interactions=1, min_item_interactions=2)
    # pass with (1, 2): nothing removed (item 4 x2, 5 x2). Then (3, 2): b goes; item 4 and 5 drop to one;
    # then a keeps 1 2 3, d falls to 1 2 and goes too; items 1 2 3 remain with a and c.
    assert keyed_sequences(t) == {"a": ["1", "2", "3"], "c": ["1", "2", "3"]}
    assert removed(summary)["users with < 3 interactions (cannot be split)"] == 12 - 6


def test_nothing_left_is_a_data_error(tmp_path, tiny_letter):
    with pytest.raises(DataError) as exc:
        run(tmp_path, input=tiny_letter)  # default 5-core
    assert str(exc.value) == (
        f"{tiny_letter}: no interactions left after filtering (12 read; k-core (users >= 5, items >= 5): -12); "
        "lower --min-user-interactions / --min-item-interactions or --min-rating"
    )
    assert not (tmp_path / "ws").exists()


def test_no_interactions_at_all(tmp_path, make_letter):
    path = make_letter({"a": [], "b": []})
    with pytest.raises(DataError) as exc:
        run(tmp_path, input=path, **LOOSE)
    assert str(exc.value) == f"{path}: no interactions found"


# ----------------------------------------------------------------------------------- ids and chronology


def test_numeric_keys_in_numeric_order_then_strings(tmp_path, make_letter):
    path = make_letter({"10": ["10", "9", "b"], "2": ["b", "a", "100"], "b": ["9", "a", "10"],
                        "a": ["100", "9", "a"], "007": ["9", "a", "b"]})
    _, t = run(tmp_path, input=path, **LOOSE)
    assert [r["user_key"] for r in t["users"]] == ["2", "007", "10", "a", "b"]
    assert [r["item_key"] for r in t["items"]] == ["9", "10", "100", "a", "b"]
    assert [r["user_id"] for r in t["users"]] == [0, 1, 2, 3, 4]


def test_chronological_with_input_order_breaking_ties(tmp_path, make_csv):
    path = make_csv("c.csv", """
        user,item,time
        u,a,5
        v,x,1
        u,b,3
        u,c,5
        v,y,1
        u,d,3
        v,z,0
    """)
    _, t = run(tmp_path, source="table", input=path, user_col="user", item_col="item", time_col="time", **LOOSE)
    assert keyed_sequences(t) == {"u": ["b", "d", "a", "c"], "v": ["z", "x", "y"]}
    assert [r["ts"] for r in t["sequences"]] == [[3, 3, 5, 5], [0, 1, 1]]


def test_iso_dates_become_epoch_seconds(tmp_path, make_csv):
    path = make_csv("iso.csv", """
        user,item,when
        u,a,2024-01-02
        u,b,2024-01-01
        u,c,2024-01-01 00:00:01
    """)
    _, t = run(tmp_path, source="table", input=path, user_col="user", item_col="item", time_col="when", **LOOSE)
    assert keyed_sequences(t) == {"u": ["b", "c", "a"]}
    assert t["sequences"][0]["ts"] == [1704067200, 1704067201, 1704153600]


def test_table_without_time_uses_row_order(tmp_path, make_csv):
    path = make_csv("n.csv", """
        item,user
        c,1
        a,2
        b,1
        a,1
        b,2
        c,2
    """)
    summary, t = run(tmp_path, source="table", input=path, user_col="user", item_col="item", **LOOSE)
    assert keyed_sequences(t) == {"1": ["c", "b", "a"], "2": ["a", "b", "c"]}
    assert [r["ts"] for r in t["sequences"]] == [[0, 2, 3], [1, 4, 5]]  # the input row numbers
    assert summary["notes"] == []


def test_table_items_file_with_its_own_key_column(tmp_path, make_csv):
    inter = make_csv("i.csv", "user,item\n1,a\n1,b\n1,c")
    items = make_csv("meta.csv", 'asin,title,price\na,Apple,1.5\nb,"Banana, ripe",2\nz,Zed,3')
    summary, t = run(tmp_path, source="table", input=inter, items=items, user_col="user", item_col="item",
                     item_key_col="asin", **LOOSE)
    assert summary["text_fields"] == ["title", "price"] and summary["items_without_text"] == 1
    assert [(r["item_key"], r["title"], r["price"]) for r in t["items"]] == [
        ("a", "Apple", "1.5"), ("b", "Banana, ripe", "2"), ("c", None, None)]


def test_missing_times_are_an_error_not_the_earliest_items(tmp_path, make_csv):
    path = make_csv("t.csv", "user,item,time\n1,a,1700000003\n1,b,\n1,c,1700000001\n1,d,")
    with pytest.raises(DataError) as exc:
        run(tmp_path, source="table", input=path, user_col="user", item_col="item", time_col="time", **LOOSE)
    assert str(exc.value) == (f"{path}: column 'time' is empty in 2 row(s) (the first is data row 2); "
                              "every interaction needs a time")


def test_recbole_atomic_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "7\t30\t5\t300\n7\t10\t2\t100\n7\t20\t4\t100\n9\t10\t5\t5\n9\t30\t1\t6\n9\t20\t3\t7\n")
    (data / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\tclass:token_seq\n"
        '10\tTen\tDrama\n20\t"Twenty, ""quoted"""\tComedy Drama\n30\tThirty\t\n')
    summary, t = run(tmp_path, source="recbole", input=data, **LOOSE)  # the directory: finds toy.inter/.item
    assert keyed_sequences(t) == {"7": ["10", "20", "30"], "9": ["10", "30", "20"]}  # ts ties: file order
    assert [r["ts"] for r in t["sequences"]] == [[100, 100, 300], [5, 6, 7]]
    assert [(r["item_key"], r["movie_title"], r["class"]) for r in t["items"]] == [
        ("10", "Ten", "Drama"), ("20", 'Twenty, "quoted"', "Comedy Drama"), ("30", "Thirty", None)]
    assert summary["text_fields"] == ["movie_title", "class"]
    # rating 1 goes; user 9 is left with two items and cannot be split
    summary, t = run(tmp_path, source="recbole", input=data / "toy.inter", min_rating=2, **LOOSE)
    assert removed(summary)["rating below 2"] == 1
    assert removed(summary)["users with < 3 interactions (cannot be split)"] == 2
    assert keyed_sequences(t) == {"7": ["10", "20", "30"]}


@settings(max_examples=12, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z0-9]{1,3}", fullmatch=True),
                       st.lists(st.integers(0, 40), min_size=0, max_size=7), min_size=1, max_size=6))
def test_letter_sequences_survive_unchanged(tmp_path_factory, inter):
    """k-core 1/1 and duplicates kept: every user with >= 3 items comes out exactly as it went in, with
    dense ids 0..n-1 for users and items."""
    tmp = tmp_path_factory.mktemp("prop")
    path = tmp / "P.inter.json"
    path.write_text(json.dumps(inter))
    expected = {u: [str(i) for i in items] for u, items in inter.items() if len(items) >= 3}
    if not expected:
        with pytest.raises(DataError):
            run(tmp, input=path, duplicates="all", **LOOSE)
        return
    summary, t = run(tmp, input=path, duplicates="all", **LOOSE)
    assert keyed_sequences(t) == expected
    assert [r["user_id"] for r in t["users"]] == list(range(len(expected)))
    assert [r["item_id"] for r in t["items"]] == list(range(summary["items"]))
    assert summary["interactions"] == sum(map(len, expected.values())) == len(t["interactions"])
