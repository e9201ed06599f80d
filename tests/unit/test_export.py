"""`bloger export-ids`: round trips in Parquet, CSV and JSONL, codebooks, --compare counts, atomic
writes, and the exact message of every bad input.

Semantic IDs are written honestly through the stage runner (a `tokenize` run whose body writes a
hand-made codes table), on a copy of the prepared tiny workspace: items 0..4 with keys 2, 3, 4, 5, 10.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from bloger_cli import outputs
from bloger_cli.artifacts import file_hash, save_torch, write_arrow
from bloger_cli.config import ExportConfig, TokenizeConfig
from bloger_cli.errors import ArtifactError, ConfigError, DataError
from bloger_cli.stages import export
from bloger_cli.workspace import Workspace, run_stage

KEYS = ["2", "3", "4", "5", "10"]
CODES = [[12, 200, 3, 0], [12, 200, 3, 1], [7, 0, 255, 0], [1, 2, 3, 0], [0, 0, 0, 0]]
SIDS = ["12-200-3-0", "12-200-3-1", "7-0-255-0", "1-2-3-0", "0-0-0-0"]
# two levels of K = 2 codes of width d = 3, exactly representable in float32 except 0.1 (its float32 value)
BOOKS = [np.array([[0.5, -1.25, 2.0], [0.1, 0.0, -3.0]], np.float32),
         np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 1e-3]], np.float32)]
STATE = {"encoder.0.weight": torch.ones(3, 8), "quantizer.codebooks.0": torch.from_numpy(BOOKS[0]),
         "quantizer.codebooks.1": torch.from_numpy(BOOKS[1]), "decoder.0.bias": torch.zeros(8)}


def tokenize(root: Path, codes: list[list[int]] = CODES, *, item_ids: list[int] | None = None,
             state_dict: dict | None = None) -> None:
    """A `tokenize` run whose body writes `codes` (and a tokenizer.pt holding `state_dict`)."""
    ws = Workspace(root)
    ids = list(range(len(codes))) if item_ids is None else item_ids
    width = len(codes[0])

    def body(ctx):
        flat = pa.array([c for row in codes for c in row], pa.int16())
        table = pa.table({"item_id": pa.array(ids, pa.int32()),
                          "codes": pa.FixedSizeListArray.from_arrays(flat, width)})  # (N, L)
        write_arrow(table, ctx.output("semantic_ids"), ctx.metadata("semantic_ids", {"levels": width}))
        if state_dict is not None:
            save_torch({"config": {}, "state_dict": state_dict, "rows": len(ids)}, ctx.output("tokenizer"),
                       ctx.metadata("tokenizer"))
        return {"items": len(ids)}

    run_stage(ws, "tokenize", TokenizeConfig(levels=width, codebook_size=256),
              {"artifact:items": file_hash(ws.path("items"))}, body, force=True)


def export_ids(root: Path, out: Path, **options):
    return export.run(ExportConfig(out=out, **options), Workspace(root))


@pytest.fixture(scope="module")
def tokenized_template(tiny_workspace_template: Path, tmp_path_factory) -> Path:
    """The prepared tiny workspace with semantic IDs CODES and a tokenizer holding BOOKS; never modified."""
    root = tmp_path_factory.mktemp("tokenized") / "ws"
    shutil.copytree(tiny_workspace_template, root)
    tokenize(root, state_dict=STATE)
    return root


@pytest.fixture
def ws(tokenized_template: Path, tmp_path: Path) -> Path:
    """A private copy of the tokenized template."""
    shutil.copytree(tokenized_template, tmp_path / "ws")
    return tmp_path / "ws"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp-*"))


# ---------------------------------------------------------------------------------------- round trips


def test_parquet_round_trip_and_result(ws, tmp_path):
    out = tmp_path / "ids.parquet"
    res = export_ids(ws, out)
    assert res.result == {"out": str(out), "format": "parquet", "rows": 5, "id_length": 4, "codebooks": None,
                          "notes": []}
    table = pq.read_table(out)
    assert table.schema.names == ["item_key", "item_id", "semantic_id", "codes"]
    assert (table.schema.field("item_id").type, table.schema.field("codes").type) == (pa.int32(), pa.list_(pa.int16()))
    assert table.to_pydict() == {"item_key": KEYS, "item_id": [0, 1, 2, 3, 4], "semantic_id": SIDS, "codes": CODES}
    assert table.schema.metadata[b"bloger.run_id"].decode() == res.run_id
    [run] = Workspace(ws).catalog.runs("export-ids")
    assert (run.status, run.result["rows"]) == ("done", 5)


def test_csv_round_trip_has_one_column_per_level(ws, tmp_path):
    out = tmp_path / "ids.csv"
    assert export_ids(ws, out).result["format"] == "csv"
    lines = out.read_text().splitlines()
    assert lines[:2] == ['"item_key","item_id","semantic_id","code_1","code_2","code_3","code_4"',
                         '"2",0,"12-200-3-0",12,200,3,0']
    table = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(column_types={"item_key": pa.string()}))
    assert table.column("item_key").to_pylist() == KEYS and table.column("semantic_id").to_pylist() == SIDS
    assert [table.column(f"code_{i + 1}").to_pylist() for i in range(4)] == [list(c) for c in zip(*CODES)]


def test_jsonl_round_trip(ws, tmp_path):
    out = tmp_path / "ids.jsonl"
    assert export_ids(ws, out).result["format"] == "jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"item_key": k, "item_id": i, "semantic_id": s, "codes": c}
                    for i, (k, s, c) in enumerate(zip(KEYS, SIDS, CODES))]
    back = duckdb.sql(f"SELECT item_key, semantic_id FROM read_json('{out}', format = 'newline_delimited')").fetchall()
    assert back == list(zip(KEYS, SIDS))


def test_format_option_overrides_the_suffix_and_parents_are_created(ws, tmp_path):
    out = tmp_path / "new" / "dir" / "ids.txt"
    assert export_ids(ws, out, format="jsonl").result["format"] == "jsonl"
    assert json.loads(out.read_text().splitlines()[0])["semantic_id"] == SIDS[0]


def test_items_without_semantic_id_are_left_out_with_a_note(tiny_workspace, tmp_path):
    tokenize(tiny_workspace, CODES[:3])
    res = export_ids(tiny_workspace, tmp_path / "ids.parquet")
    assert (res.result["rows"], res.result["notes"]) == (3, ["2 of 5 items have no semantic ID and are not exported"])
    assert pq.read_table(tmp_path / "ids.parquet").column("item_key").to_pylist() == KEYS[:3]


# ------------------------------------------------------------------------------------------ codebooks


def expected_codebook_rows() -> list[tuple[int, int, list[float]]]:
    return [(level, code, BOOKS[level - 1][code].tolist()) for level in (1, 2) for code in (0, 1)]


def test_codebooks_parquet(ws, tmp_path):
    books = tmp_path / "books.parquet"
    res = export_ids(ws, tmp_path / "ids.csv", codebooks=books)
    assert res.result["codebooks"] == str(books) and (tmp_path / "ids.csv").is_file()
    table = pq.read_table(books)
    assert table.schema == pa.schema([("level", pa.int16()), ("code", pa.int16()),
                                      ("vector", pa.list_(pa.float32()))]).with_metadata(table.schema.metadata)
    rows = list(zip(*table.to_pydict().values()))
    assert [(lv, c, np.float32(v).tolist()) for lv, c, v in rows] == expected_codebook_rows()


def test_codebooks_csv_has_one_column_per_dimension(ws, tmp_path):
    books = tmp_path / "books.csv"
    export_ids(ws, tmp_path / "ids.parquet", codebooks=books)
    assert books.read_text().splitlines()[:2] == ['"level","code","vector_1","vector_2","vector_3"', "1,0,0.5,-1.25,2"]
    table = pacsv.read_csv(books, convert_options=pacsv.ConvertOptions(
        column_types={f"vector_{i}": pa.float32() for i in (1, 2, 3)}))
    vectors = np.stack([table.column(f"vector_{i}").to_numpy() for i in (1, 2, 3)], axis=1)
    assert np.array_equal(vectors, np.concatenate(BOOKS))


def test_codebooks_jsonl_prints_float32_values_shortest(ws, tmp_path):
    books = tmp_path / "books.jsonl"
    export_ids(ws, tmp_path / "ids.jsonl", codebooks=books)
    lines = books.read_text().splitlines()
    assert lines[1] == '{"level":1,"code":1,"vector":[0.1,0.0,-3.0]}'
    vectors = np.array([json.loads(line)["vector"] for line in lines], np.float32)
    assert np.array_equal(vectors, np.concatenate(BOOKS))


def test_codebooks_of_the_real_rqvae_state_dict(tiny_workspace, tmp_path):
    rqvae = pytest.importorskip("bloger_cli.tokenizer.rqvae")
    model = rqvae.RQVAE(rqvae.RQVAEConfig(input_dim=8, code_dim=4, levels=3, codebook_size=5))
    tokenize(tiny_workspace, [c[:3] for c in CODES], state_dict=model.state_dict())
    export_ids(tiny_workspace, tmp_path / "ids.parquet", codebooks=tmp_path / "books.parquet")
    table = pq.read_table(tmp_path / "books.parquet")
    assert table.num_rows == 15 and table.column("level").to_pylist() == [1] * 5 + [2] * 5 + [3] * 5
    expected = torch.cat([book.detach() for book in model.quantizer.codebooks]).numpy()
    assert np.array_equal(np.array(table.column("vector").to_pylist(), np.float32), expected)


def test_tokenizer_without_codebooks_fails_and_leaves_out_unchanged(tiny_workspace, tmp_path):
    tokenize(tiny_workspace, state_dict={"encoder.0.weight": torch.ones(2, 2)})
    out = tmp_path / "ids.parquet"
    out.write_bytes(b"old")
    with pytest.raises(ArtifactError) as exc:
        export_ids(tiny_workspace, out, codebooks=tmp_path / "books.parquet")
    assert str(exc.value) == (
        f"{tiny_workspace / 'tokenizer.pt'}: no codebooks for levels 1..L in the state_dict (looked for keys "
        "'codebooks.<level>' or '<prefix>.codebooks.<level>[.weight]', found none); "
        "re-run `bloger tokenize --force`")
    assert out.read_bytes() == b"old" and not (tmp_path / "books.parquet").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- compare


def test_compare_counts_on_a_hand_made_pair(ws, tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("item_key,semantic_id,note\n"
                   "2,12-200-3-0,same\n3,9-9-9-9,changed\n4,7-0-255-0,same\n5,1-2-3-1,changed\n77,5-5-5-5,gone\n")
    res = export_ids(ws, tmp_path / "ids.parquet", compare=old)
    assert {k: v for k, v in res.result.items() if k.startswith("compare_")} == {
        "compare_common": 4, "compare_changed": 2, "compare_changed_share": 0.5, "compare_added": 1,
        "compare_removed": 1}


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_compare_reads_each_format_after_a_new_tokenize(ws, tmp_path, suffix):
    old = tmp_path / f"ids{suffix}"
    export_ids(ws, old)
    tokenize(ws, [CODES[0], [3, 3, 3, 3], CODES[2], CODES[3], [4, 4, 4, 4]])
    res = export_ids(ws, old, compare=old)  # compare with the previous version, then replace it
    assert [res.result[k] for k in ("compare_common", "compare_changed", "compare_added", "compare_removed")] == [
        5, 2, 0, 0]
    assert res.result["compare_changed_share"] == pytest.approx(0.4)
    assert export_ids(ws, tmp_path / "again.parquet", compare=old).result["compare_changed"] == 0


def test_compare_file_missing(ws, tmp_path):
    with pytest.raises(DataError) as exc:
        export_ids(ws, tmp_path / "ids.csv", compare=tmp_path / "nope.csv")
    assert str(exc.value) == (f"--compare {tmp_path / 'nope.csv'}: file not found; "
                              "give an earlier `bloger export-ids` output")


@pytest.mark.parametrize("header, missing", [("item_key,sid", "semantic_id"), ("key,semantic_id", "item_key")])
def test_compare_file_without_a_column(ws, tmp_path, header, missing):
    old = tmp_path / "old.csv"
    old.write_text(f"{header}\n2,1-2\n")
    with pytest.raises(DataError) as exc:
        export_ids(ws, tmp_path / "ids.csv", compare=old)
    assert str(exc.value) == (f"--compare {old}: missing column {missing!r} (columns are {header.replace(',', ', ')}); "
                              "give a file written by `bloger export-ids`")


def test_compare_file_with_a_repeated_key(ws, tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text('{"item_key": "2", "semantic_id": "1-2"}\n{"item_key": "2", "semantic_id": "1-3"}\n')
    with pytest.raises(DataError) as exc:
        export_ids(ws, tmp_path / "ids.csv", compare=old)
    assert str(exc.value) == f"--compare {old}: item_key '2' appears more than once"


def test_compare_file_that_is_not_parquet(ws, tmp_path):
    old = tmp_path / "old.parquet"
    old.write_text("item_key,semantic_id\n")
    with pytest.raises(DataError) as exc:
        export_ids(ws, tmp_path / "ids.csv", compare=old)
    assert str(exc.value).startswith(f"--compare {old}: not a readable parquet file (")


def test_compare_file_of_unknown_format(ws, tmp_path):
    old = tmp_path / "old.txt"
    old.write_text("x")
    with pytest.raises(ConfigError) as exc:
        export_ids(ws, tmp_path / "ids.csv", compare=old)
    assert str(exc.value) == (f"--compare {old}: cannot tell the format from suffix '.txt'; "
                              "--compare reads .parquet, .csv and .jsonl exports")


# ----------------------------------------------------------------------------------------- bad input


def test_no_semantic_ids_yet(tiny_workspace, tmp_path):
    with pytest.raises(ArtifactError) as exc:
        export_ids(tiny_workspace, tmp_path / "ids.csv")
    assert str(exc.value) == (f"no semantic_ids artifact at {tiny_workspace / 'semantic_ids.parquet'}; "
                              "run `bloger tokenize` first")
    assert not (tmp_path / "ids.csv").exists()


def test_from_train_is_refused_until_training_exists(ws, tmp_path):
    with pytest.raises(ConfigError) as exc:
        export_ids(ws, tmp_path / "ids.csv", **{"from": "train"})
    assert str(exc.value) == f"--from train: no trained model in {ws} yet; run `bloger train-bilevel` first"


@pytest.mark.parametrize("name, said", [("ids.txt", "suffix '.txt'"), ("ids", "no suffix")])
def test_unknown_out_format(ws, tmp_path, name, said):
    with pytest.raises(ConfigError) as exc:
        export_ids(ws, tmp_path / name)
    assert str(exc.value) == (f"--out {tmp_path / name}: cannot tell the format from {said}; "
                              "give --format parquet|csv|jsonl, or end the name in .parquet, .csv or .jsonl")


def test_unknown_codebooks_format(ws, tmp_path):
    with pytest.raises(ConfigError) as exc:
        export_ids(ws, tmp_path / "ids.csv", codebooks=tmp_path / "books.npy")
    assert str(exc.value).startswith(f"--codebooks {tmp_path / 'books.npy'}: cannot tell the format from suffix '.npy'")


def test_out_is_a_directory(ws, tmp_path):
    with pytest.raises(ConfigError) as exc:
        export_ids(ws, tmp_path, format="csv")
    assert str(exc.value) == f"--out {tmp_path} is a directory; give a file name, e.g. {tmp_path / 'ids.parquet'}"


def test_out_and_codebooks_are_the_same_file(ws, tmp_path):
    with pytest.raises(ConfigError) as exc:
        export_ids(ws, tmp_path / "x.csv", codebooks=tmp_path / "x.csv")
    assert str(exc.value) == f"--out and --codebooks are the same file ({tmp_path / 'x.csv'}); " \
                             "give --codebooks a file name of its own"


def test_semantic_ids_for_unknown_items(tiny_workspace, tmp_path):
    tokenize(tiny_workspace, CODES[:2], item_ids=[0, 9])
    with pytest.raises(ArtifactError) as exc:
        export_ids(tiny_workspace, tmp_path / "ids.csv")
    assert str(exc.value) == (f"{tiny_workspace / 'semantic_ids.parquet'}: 1 item_id(s) not in "
                              f"{tiny_workspace / 'items.parquet'}; re-run `bloger tokenize --force`")


def test_a_failing_write_leaves_every_existing_file_unchanged(ws, tmp_path, monkeypatch):
    out, books = tmp_path / "ids.parquet", tmp_path / "books.jsonl"
    out.write_bytes(b"old ids")
    books.write_bytes(b"old books")

    def half_written(con, table, path, metadata):
        path.write_text('{"level":1')
        raise OSError("disk full")

    monkeypatch.setitem(outputs.WRITERS, "jsonl", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_ids(ws, out, codebooks=books)
    assert (out.read_bytes(), books.read_bytes(), leftovers(tmp_path)) == (b"old ids", b"old books", [])
    assert [r.status for r in Workspace(ws).catalog.runs("export-ids")] == ["failed"]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_export_json(cli, ws, tmp_path):
    out = tmp_path / "ids.csv"
    result = cli("export-ids", "-w", ws, "-o", out, "--codebooks", tmp_path / "b.parquet", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["stage"] == "export-ids" and payload["result"]["rows"] == 5
    assert payload["result"]["codebooks"] == str(tmp_path / "b.parquet") and out.is_file()


@pytest.mark.parametrize("args, code, stderr", [
    (["-o", "ids.txt"], 2, "error: --out ids.txt: cannot tell the format from suffix '.txt'\n"
                           "  hint: give --format parquet|csv|jsonl, or end the name in .parquet, .csv or .jsonl\n"),
    (["-o", "ids.csv", "--from", "train"], 2, "error: --from train: no trained model in {ws} yet\n"
                                              "  hint: run `bloger train-bilevel` first\n"),
    (["-o", "ids.csv", "--compare", "gone.csv"], 1, "error: --compare gone.csv: file not found\n"
                                                    "  hint: give an earlier `bloger export-ids` output\n"),
])
def test_cli_errors(cli, ws, args, code, stderr):
    result = cli("export-ids", "-w", ws, *args)
    assert (result.exit_code, result.stderr) == (code, stderr.format(ws=ws))
