"""Damaged files: a truncated or foreign Parquet file, a truncated checkpoint, a checkpoint of another
model size or ID layout, a catalog that is not DuckDB or is of a newer format, embeddings with NaN rows.
Each gives one error line naming the file and what to run, exit code 2, and touches nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL

TRAIN = ["--mode", "fixed", "--epochs", "1", "--batch-size", "64", "--device", "cpu", *TINY_MODEL]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_text("user_id,items\n1,2\n"),
     "error: {p} is not a readable Parquet file (Parquet magic bytes not found in footer. Either the file is "
     "corrupted or this is not a parquet file.)\n  hint: re-run `bloger prepare --force`"),
    (truncate, "error: {p} is not a readable Parquet file (Parquet magic bytes not found in footer. Either the file "
     "is corrupted or this is not a parquet file.)\n  hint: re-run `bloger prepare --force`"),
    (lambda p: shutil.copy(p.with_name("items.parquet"), p),
     "error: {p} is not a bloger sequences artifact (kind 'items')\n  hint: re-run `bloger prepare --force`"),
    (lambda p: pq.write_table(pa.table({"user_id": pa.array([1], pa.int32())}), p),
     "error: {p} is not a bloger sequences artifact (kind None)\n  hint: re-run `bloger prepare --force`"),
], ids=["text", "truncated", "another-kind", "foreign-schema"])
def test_a_damaged_parquet_input(trained_workspace: Path, fails_cleanly, damage, expected) -> None:
    path = trained_workspace / "sequences.parquet"
    damage(path)
    message = fails_cleanly(trained_workspace, 2, "train-bilevel", "-w", trained_workspace, *TRAIN, "--force")
    assert message == expected.format(p=path)


def test_a_truncated_checkpoint(trained_workspace: Path, fails_cleanly) -> None:
    path = trained_workspace / "best.pt"
    truncate(path)
    message = fails_cleanly(trained_workspace, 2, "evaluate", "-w", trained_workspace, "--force")
    assert message.startswith(f"error: {path} is not a readable checkpoint (")
    assert message.endswith("\n  hint: re-run `bloger train-bilevel --force`")


def test_a_checkpoint_of_another_workspace(trained_workspace: Path, tiny_workspace: Path, fails_cleanly) -> None:
    # the tiny letter workspace: other users and items, so another ID layout as well
    path = trained_workspace / "best.pt"
    for command in ("evaluate", "recommend"):
        extra = ["--out", tiny_workspace.parent / "recs.csv"] if command == "recommend" else []
        message = fails_cleanly(tiny_workspace, 2, command, "-w", tiny_workspace, "--checkpoint", path, *extra)
        assert message.startswith(f"error: checkpoint {path} was trained on other sequences (recorded ")
        assert message.endswith("\n  hint: use it in its own workspace, or re-run `bloger train-bilevel` here")


def test_resume_from_a_checkpoint_of_another_model_size(trained_workspace: Path, fails_cleanly, cli) -> None:
    # the refusal comes inside the stage run, so the catalog records it as a failed run: artifacts untouched
    other = trained_workspace.parent / "other"
    shutil.copytree(trained_workspace, other)
    assert cli("train-bilevel", "-w", other, *TRAIN, "--set", "model.d_model=24", "--force").exit_code == 0
    (trained_workspace / "training").mkdir()
    shutil.copy(other / "last.pt", trained_workspace / "training" / "last.pt")
    message = fails_cleanly(trained_workspace, 2, "train-bilevel", "-w", trained_workspace, *TRAIN, "--resume",
                            ignore=("catalog.duckdb",))
    assert message == (
        f"error: cannot resume from {trained_workspace / 'training' / 'last.pt'}: it was trained with another config "
        "(model.d_model: 24 then, 16 now)\n"
        "  hint: resume with the same options, or start afresh without --resume")


@pytest.mark.parametrize("sqlite", [False, True], ids=["text", "sqlite"])  # sqlite: DuckDB would download an extension
def test_a_catalog_that_is_not_duckdb(trained_workspace: Path, fails_cleanly, sqlite: bool) -> None:
    path = trained_workspace / "catalog.duckdb"
    path.write_bytes(b"SQLite format 3\x00" + bytes(4096) if sqlite else b"runs,artifacts\n" * 300)
    for args in (["status"], ["evaluate", "--force"]):
        message = fails_cleanly(trained_workspace, 2, *args[:1], "-w", trained_workspace, *args[1:])
        assert message == (f"error: {path} is not a bloger catalog (not a DuckDB database)\n"
                           f"  hint: move it away and re-run the stages from `bloger prepare`")


def test_a_catalog_of_a_newer_format(trained_workspace: Path, fails_cleanly) -> None:
    import duckdb

    from bloger_cli.catalog import CATALOG_FORMAT

    path = trained_workspace / "catalog.duckdb"
    con = duckdb.connect(str(path))
    con.execute("UPDATE bloger_catalog SET format = ?", [CATALOG_FORMAT + 1])
    con.close()
    for args in (["status"], ["evaluate", "--force"]):
        message = fails_cleanly(trained_workspace, 2, *args[:1], "-w", trained_workspace, *args[1:])
        assert message == (f"error: {path} has catalog format {CATALOG_FORMAT + 1}, this bloger reads format "
                           f"{CATALOG_FORMAT} or older\n  hint: upgrade bloger (pip install -U bloger)")


def test_embeddings_with_nan_rows(items64_workspace: Path, make_embeddings, fails_cleanly) -> None:
    vectors = np.random.default_rng(0).normal(size=(64, 16))
    vectors[[5, 9]] = np.nan
    make_embeddings(items64_workspace, vectors)
    # read inside the stage run: the catalog records a failed run, the artifacts stay as they were
    message = fails_cleanly(items64_workspace, 2, "tokenize", "-w", items64_workspace, "--method", "rq-kmeans",
                            "--levels", "2", "--codebook-size", "4", ignore=("catalog.duckdb",))
    assert message == (f"error: {items64_workspace / 'embeddings.parquet'}: the embedding of item 5 is not finite "
                       "(NaN or inf); 2 item(s) affected\n"
                       "  hint: re-run `bloger embed --force` (and check the input it embeds)")
