"""Artifact I/O: footer metadata, schema checks with exact messages, and round trips through both writers."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bloger_cli import __version__
from bloger_cli.artifacts import (
    SPECS,
    check_schema,
    copy_query,
    file_hash,
    make_metadata,
    read_info,
    read_table,
    temp_path_for,
    write_arrow,
)
from bloger_cli.errors import ArtifactError, DataError

INTERACTIONS = SPECS["interactions"]
ITEMS = SPECS["items"]
SEQUENCES = SPECS["sequences"]
FIX = "re-run `bloger prepare --force`"


def interactions_table(users=(0, 0, 1), items=(1, 2, 1), ts=(5, 6, 7)) -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.int32()), "item_id": pa.array(items, pa.int32()),
                     "ts": pa.array(ts, pa.int64())})


def md(spec=INTERACTIONS, meta=None):
    return make_metadata(spec, "cafe0123", {"interactions": "abc"}, meta)


def test_metadata_keys():
    assert md(meta={"b": 1, "a": [2]}) == {
        "bloger.kind": "interactions", "bloger.schema_version": "1", "bloger.config_hash": "cafe0123",
        "bloger.parents": '{"interactions": "abc"}', "bloger.version": __version__,
        "bloger.meta": '{"a": [2], "b": 1}',
    }


def test_write_arrow_round_trip_with_metadata(tmp_path):
    path = tmp_path / "interactions.parquet"
    table = interactions_table()
    write_arrow(table, path, md(meta={"source": "letter"}))
    info = read_info(path, INTERACTIONS, with_hash=True)
    assert (info.kind, info.path, info.rows, info.config_hash) == ("interactions", path, 3, "cafe0123")
    assert info.parents == {"interactions": "abc"} and info.meta == {"source": "letter"}
    assert info.content_hash == file_hash(path) and len(info.content_hash) == 16
    assert read_table(path, INTERACTIONS).equals(table)
    assert read_table(path, INTERACTIONS, columns=["ts"]).column("ts").to_pylist() == [5, 6, 7]


def test_write_arrow_keeps_existing_schema_metadata(tmp_path):
    path = tmp_path / "i.parquet"
    table = interactions_table().replace_schema_metadata({"mine": "1"})
    write_arrow(table, path, md())
    kv = pq.read_metadata(path).metadata
    assert kv[b"mine"] == b"1" and kv[b"bloger.kind"] == b"interactions"


def test_read_info_without_hash_leaves_it_empty(tmp_path):
    path = tmp_path / "i.parquet"
    write_arrow(interactions_table(), path, md())
    assert read_info(path, INTERACTIONS).content_hash == ""


def test_copy_query_round_trip_with_lists_and_quotes(tmp_path):
    """DuckDB names list items differently from pyarrow; the schema check must accept both."""
    path = tmp_path / "it's here" / "sequences.parquet"
    path.parent.mkdir()
    meta = {"note": "it's \"quoted\"", "n": 2}
    con = duckdb.connect()
    copy_query(
        con,
        "SELECT user_id::INTEGER AS user_id, items::INTEGER[] AS items, ts::BIGINT[] AS ts FROM "
        "(VALUES (0, [3, 1], [10, 11]), (1, [2], [12])) v(user_id, items, ts) ORDER BY user_id",
        path, make_metadata(SEQUENCES, "h'1", {"interactions": "p"}, meta),
    )
    info = read_info(path, SEQUENCES)
    assert (info.rows, info.config_hash, info.parents, info.meta) == (2, "h'1", {"interactions": "p"}, meta)
    table = read_table(path, SEQUENCES)
    assert table.column("items").to_pylist() == [[3, 1], [2]]
    assert table.column("ts").to_pylist() == [[10, 11], [12]]


def test_copy_query_untyped_integers_fail_the_schema_check(tmp_path):
    """DuckDB's integer literals are INTEGER (int32): a ts column written without a cast is caught."""
    path = tmp_path / "interactions.parquet"
    copy_query(duckdb.connect(), "SELECT 1::INTEGER AS user_id, 2::INTEGER AS item_id, 3 AS ts", path, md())
    with pytest.raises(ArtifactError) as exc:
        read_info(path, INTERACTIONS)
    assert str(exc.value) == f"{path}: column 'ts' has type int32, expected int64; {FIX}"


def test_missing_column_names_file_column_and_types(tmp_path):
    schema = pa.schema([("user_id", pa.int32()), ("ts", pa.int64())])
    with pytest.raises(ArtifactError) as exc:
        check_schema(tmp_path / "f.parquet", schema, INTERACTIONS)
    assert str(exc.value) == (f"{tmp_path / 'f.parquet'}: missing column 'item_id' (expected int32); "
                              f"columns are user_id, ts; {FIX}")


def test_missing_column_in_an_empty_schema(tmp_path):
    with pytest.raises(ArtifactError) as exc:
        check_schema(tmp_path / "f.parquet", pa.schema([]), INTERACTIONS)
    assert str(exc.value) == (f"{tmp_path / 'f.parquet'}: missing column 'user_id' (expected int32); "
                              f"columns are none; {FIX}")


@pytest.mark.parametrize(("spec", "column", "dtype", "expected"), [
    (INTERACTIONS, "user_id", pa.int64(), "int32"),
    (INTERACTIONS, "ts", pa.string(), "int64"),
    (SEQUENCES, "items", pa.list_(pa.int64()), "list<item: int32>"),
    (SEQUENCES, "items", pa.int32(), "list<item: int32>"),
    (ITEMS, "item_key", pa.int32(), "string"),
])
def test_wrong_type_names_expected_and_actual(tmp_path, spec, column, dtype, expected):
    schema = pa.schema([(f.name, dtype if f.name == column else f.type) for f in spec.schema])
    with pytest.raises(ArtifactError) as exc:
        check_schema(tmp_path / "f.parquet", schema, spec)
    assert str(exc.value) == (f"{tmp_path / 'f.parquet'}: column {column!r} has type {dtype}, "
                              f"expected {expected}; {FIX}")


@pytest.mark.parametrize("dtype", [pa.large_list(pa.int32()), pa.list_(pa.field("element", pa.int32()))])
def test_list_item_name_and_large_lists_accepted(tmp_path, dtype):
    schema = pa.schema([("user_id", pa.int32()), ("items", dtype), ("ts", pa.list_(pa.int64()))])
    check_schema(tmp_path / "f.parquet", schema, SEQUENCES)


def test_extra_columns(tmp_path):
    path = tmp_path / "f.parquet"
    base = list(ITEMS.schema)
    check_schema(path, pa.schema(base + [("title", pa.string()), ("brand", pa.large_string())]), ITEMS)
    with pytest.raises(ArtifactError) as exc:
        check_schema(path, pa.schema(base + [("price", pa.float64())]), ITEMS)
    assert str(exc.value) == f"{path}: unexpected column 'price' of type double (extra columns must be string); {FIX}"
    with pytest.raises(ArtifactError) as exc:
        check_schema(path, pa.schema(list(INTERACTIONS.schema) + [("title", pa.string())]), INTERACTIONS)
    assert str(exc.value) == f"{path}: unexpected column 'title' of type string (no extra columns allowed); {FIX}"


def test_read_info_missing_file(tmp_path):
    with pytest.raises(ArtifactError) as exc:
        read_info(tmp_path / "interactions.parquet", INTERACTIONS)
    assert str(exc.value) == f"no interactions artifact at {tmp_path / 'interactions.parquet'}; run `bloger prepare` first"
    assert isinstance(exc.value, DataError) and exc.value.exit_code == 1


def test_read_info_not_parquet(tmp_path):
    path = tmp_path / "interactions.parquet"
    path.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(ArtifactError) as exc:
        read_info(path, INTERACTIONS)
    assert str(exc.value).startswith(f"{path} is not a readable Parquet file (")
    assert str(exc.value).endswith(f"); {FIX}")


def test_read_info_wrong_kind(tmp_path):
    path = tmp_path / "interactions.parquet"
    write_arrow(interactions_table(), path, md(spec=SPECS["users"]))
    with pytest.raises(ArtifactError) as exc:
        read_info(path, INTERACTIONS)
    assert str(exc.value) == f"{path} is not a bloger interactions artifact (kind 'users'); {FIX}"


def test_read_info_plain_parquet_without_metadata(tmp_path):
    path = tmp_path / "interactions.parquet"
    pq.write_table(interactions_table(), path)
    with pytest.raises(ArtifactError) as exc:
        read_info(path, INTERACTIONS)
    assert str(exc.value) == f"{path} is not a bloger interactions artifact (kind None); {FIX}"


def test_read_info_wrong_schema_version(tmp_path):
    path = tmp_path / "interactions.parquet"
    write_arrow(interactions_table(), path, {**md(), "bloger.schema_version": "7"})
    with pytest.raises(ArtifactError) as exc:
        read_info(path, INTERACTIONS)
    assert str(exc.value) == f"{path} has schema version 7, this bloger reads version 1; {FIX}"


def test_read_table_checks_the_footer_first(tmp_path):
    path = tmp_path / "interactions.parquet"
    write_arrow(interactions_table(), path, md(spec=SPECS["users"]))
    with pytest.raises(ArtifactError):
        read_table(path, INTERACTIONS)


def test_temp_path_is_a_hidden_sibling(tmp_path):
    tmp = temp_path_for(tmp_path / "items.parquet")
    assert tmp.parent == tmp_path and tmp.name.startswith(".items.parquet.tmp-")


def test_file_hash_changes_with_one_byte(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 3_000_000)  # more than one read block
    b.write_bytes(b"x" * 2_999_999 + b"y")
    assert file_hash(a) != file_hash(b) and file_hash(a) == file_hash(a)


INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(INT32, INT32, INT64), max_size=30), st.dictionaries(st.text(max_size=5), st.integers()))
def test_small_tables_round_trip_through_both_writers(tmp_path_factory, rows, meta):
    users, items, ts = (list(c) for c in zip(*rows)) if rows else ([], [], [])
    table = interactions_table(users, items, ts)
    tmp = tmp_path_factory.mktemp("rt")
    write_arrow(table, tmp / "a.parquet", md(meta=meta))
    assert read_table(tmp / "a.parquet", INTERACTIONS).equals(table)
    assert read_info(tmp / "a.parquet", INTERACTIONS).meta == json.loads(json.dumps(meta))

    con = duckdb.connect()
    con.register("src", table)
    copy_query(con, "SELECT * FROM src", tmp / "b.parquet", md(meta=meta))
    info = read_info(tmp / "b.parquet", INTERACTIONS)
    assert info.rows == len(rows) and info.meta == json.loads(json.dumps(meta))
    assert read_table(tmp / "b.parquet", INTERACTIONS).to_pylist() == table.to_pylist()
