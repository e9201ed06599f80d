"""Bad input, every command: a table of options out of range, files of the wrong kind, empty and one-user
datasets, unknown columns, duplicate keys, non-UTF-8 text, huge values, and paths with spaces and unicode.
Each case asserts the exact error line (and hint), the exit code, no traceback, and that the workspace's
artifacts are byte for byte as they were (the catalog may record a refused run; its current artifacts
must not change)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from conftest import TINY_MODEL


class Case(NamedTuple):
    id: str
    args: list[str]  # "{ws}" is the workspace, "{d}" the directory of the case's files
    code: int
    expected: str  # the error line and hint; "{ws}" and "{d}" as in args
    setup: Callable[[Path, Path], None] | None = None  # (workspace, files directory)


def text(name: str, content: str | bytes) -> Callable[[Path, Path], None]:
    def make(ws: Path, d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return make


def npy(name: str, matrix: np.ndarray) -> Callable[[Path, Path], None]:
    return lambda ws, d: np.save(d / name, matrix)


TABLE = "--source table --user-col user --item-col item --time-col ts --min-user-interactions 1 " \
        "--min-item-interactions 1".split()
CSV = "user,item,ts\n"
TRAIN = ["--mode", "fixed", "--epochs", "1", "--device", "cpu", *TINY_MODEL]

CASES = [
    # prepare: options and config
    Case("prepare-k-core-zero", ["prepare", "--min-user-interactions", "0"], 2,
         "error: invalid prepare config (1 error):\n  • min_user_interactions: Input should be greater "
         "than or equal to 1 (got 0)"),
    Case("prepare-negative-history", ["prepare", "--max-history", "-3"], 2,
         "error: invalid prepare config (1 error):\n  • max_history: Input should be greater than or equal "
         "to 1 (got -3)"),
    Case("tokenize-huge-levels", ["tokenize", "--levels", "99999999999999999999"], 2,
         "error: invalid tokenize config (1 error):\n  • levels: Input should be less than or equal to 16 "
         "(got 99999999999999999999)"),
    Case("prepare-unknown-source", ["prepare", "--source", "nope"], 2,
         "error: invalid prepare config (1 error):\n  • source: Input should be 'letter', 'amazon', "
         "'amazon2023', 'movielens', 'recbole', 'table' or 'synthetic' (got 'nope')"),
    Case("prepare-unknown-duplicates", ["prepare", "--duplicates", "nope"], 2,
         "error: invalid prepare config (1 error):\n  • duplicates: Input should be 'first' or 'all' (got "
         "'nope')"),
    Case("prepare-unknown-set-key", ["prepare", "--set", "colour=red"], 2,
         "error: invalid prepare config (1 error):\n  • colour: unknown key (check the spelling; `bloger "
         "prepare --help` lists options)"),
    Case("prepare-set-not-a-number", ["prepare", "--set", "min_rating=abc"], 2,
         "error: invalid prepare config (1 error):\n  • min_rating: Input should be a valid number, unable "
         "to parse string as a number (got 'abc')"),
    Case("prepare-set-without-equals", ["prepare", "--set", "min_rating"], 2,
         "error: --set 'min_rating': expected key=value, e.g. --set min_user_interactions=3"),
    Case("config-missing", ["prepare", "--config", "{d}/none.toml"], 2,
         "error: config file {d}/none.toml does not exist"),
    Case("config-not-toml", ["prepare", "--config", "{d}/c.toml"], 2,
         "error: config file {d}/c.toml is not valid TOML: Expected ']' at the end of a table declaration "
         "(at line 1, column 9)", text("c.toml", "[prepare\nx=")),
    Case("config-not-utf8", ["prepare", "--config", "{d}/c.toml"], 2,
         "error: config file {d}/c.toml is not UTF-8 text (invalid start byte at byte 20)",
         text("c.toml", b"[prepare]\nsource = '\xff'\n")),
    Case("config-unknown-section", ["prepare", "--config", "{d}/c.toml"], 2,
         "error: config file {d}/c.toml: unknown section(s) 'prepar'\n  hint: sections are the stage "
         "names: prepare, embed, tokenize, train-bilevel, evaluate, export-ids, recommend, export-model, "
         "baseline, report", text("c.toml", "[prepar]\n")),
    # prepare: input files
    Case("prepare-missing-input", ["prepare", *TABLE, "--input", "{d}/none.csv"], 1,
         "error: interactions file {d}/none.csv does not exist"),
    Case("prepare-path-with-spaces-and-unicode", ["prepare", *TABLE, "--input", "{d}/dätä sét/ïn put.csv"], 1,
         "error: interactions file {d}/dätä sét/ïn put.csv does not exist"),
    Case("prepare-empty-csv", ["prepare", *TABLE, "--input", "{d}/e.csv"], 1,
         "error: {d}/e.csv: no interactions found", text("e.csv", CSV)),
    Case("prepare-one-user", ["prepare", *TABLE, "--input", "{d}/one.csv"], 1,
         "error: {d}/one.csv: no interactions left after filtering (2 read; users with < 3 interactions "
         "(cannot be split): -2)\n  hint: lower --min-user-interactions / --min-item-interactions or "
         "--min-rating",
         text("one.csv", CSV + "u1,a,1\nu1,b,2\n")),
    Case("prepare-unknown-column", [*"prepare --source table --user-col who --item-col item --time-col ts".split(),
                                    "--input", "{d}/t.csv"], 1,
         "error: {d}/t.csv: no column 'who' (from --user-col); columns are user, item, ts",
         text("t.csv", CSV + "u1,a,1\n")),
    Case("prepare-non-utf8-csv", ["prepare", *TABLE, "--input", "{d}/bad.csv"], 1,
         "error: {d}/bad.csv: cannot read it (Invalid Input Error: CSV Error on Line: 2)",
         text("bad.csv", CSV.encode() + b"u\xff\xfe1,a,1\nu2,b,2\n")),
    Case("prepare-binary-as-csv", ["prepare", *TABLE, "--input", "{d}/bin.csv"], 1,
         "error: {d}/bin.csv: cannot read it (Invalid Input Error: Error when sniffing file "
         "\"{d}/bin.csv\".)",
         text("bin.csv", bytes(range(256)) * 4)),
    Case("prepare-duplicate-item-keys", ["prepare", *TABLE, "--input", "{d}/t.csv", "--items", "{d}/items.csv",
                                         "--item-key-col", "item"], 1,
         "error: {d}/items.csv: item key 'a' has 2 rows (column 'item'); every item needs exactly one row "
         "of text",
         lambda ws, d: (text("t.csv", CSV + "u1,a,1\nu1,b,2\nu1,c,3\nu2,a,4\nu2,b,5\nu2,c,6\n")(ws, d),
                        text("items.csv", "item,title\na,A\na,again\nb,B\nc,C\n")(ws, d))),
    Case("prepare-huge-timestamp", ["prepare", *TABLE, "--input", "{d}/t.csv"], 1,
         "error: {d}/t.csv: column 'ts' has a timestamp out of range (e.g. '99999999999999999999999999'); "
         "expected epoch numbers within 64 bits",
         text("t.csv", CSV + "u1,a,1\nu1,b,99999999999999999999999999\n")),
    Case("prepare-workspace-is-a-file", ["prepare", "-w", "{d}/f", *TABLE, "--input", "{d}/t.csv"], 2,
         "error: workspace {d}/f is a file, not a directory\n  hint: give --workspace a directory path",
         lambda ws, d: (text("f", "x")(ws, d), text("t.csv", CSV + "u1,a,1\n")(ws, d))),
    # embed
    Case("embed-zero-batch", ["embed", "--batch-size", "0"], 2,
         "error: invalid embed config (1 error):\n  • batch_size: Input should be greater than or equal to "
         "1 (got 0)"),
    Case("embed-unknown-missing-text", ["embed", "--on-missing-text", "maybe"], 2,
         "error: invalid embed config (1 error):\n  • on_missing_text: Input should be 'error', 'skip' or "
         "'empty' (got 'maybe')"),
    Case("embed-from-text-file", ["embed", "--from-file", "{d}/v.npy", "--force"], 1,
         "error: {d}/v.npy: not a readable .npy matrix (This file contains pickled (object) data. If you "
         "trust the file you can load it unsafely using the `allow_pickle=` keyword argument or "
         "`pickle.load()`.)\n  hint: a .npy file needs one row per item of items.parquet, in item_id order "
         "(row i = item_id i)", text("v.npy", "not numpy")),
    Case("embed-from-file-wrong-rows", ["embed", "--from-file", "{d}/v.npy", "--force"], 1,
         "error: {d}/v.npy: 3 rows but items.parquet has 64 items\n  hint: a .npy file needs one row per "
         "item of items.parquet, in item_id order (row i = item_id i)",
         npy("v.npy", np.zeros((3, 4), np.float32))),
    Case("embed-from-file-nan", ["embed", "--from-file", "{d}/v.npy", "--force"], 1,
         "error: {d}/v.npy: row 0 (item_id 0) has a non-finite value (nan); 64 of 64 rows have NaN or inf "
         "values\n  hint: every embedding must be finite: fix those rows and run again",
         npy("v.npy", np.full((64, 4), np.nan, np.float32))),
    # tokenize
    Case("tokenize-zero-levels", ["tokenize", "--levels", "0"], 2,
         "error: invalid tokenize config (1 error):\n  • levels: Input should be greater than or equal to "
         "1 (got 0)"),
    Case("tokenize-codebook-of-one", ["tokenize", "--codebook-size", "1"], 2,
         "error: invalid tokenize config (1 error):\n  • codebook_size: Input should be greater than or "
         "equal to 2 (got 1)"),
    Case("tokenize-huge-codebook", ["tokenize", "--codebook-size", "100000"], 2,
         "error: invalid tokenize config (1 error):\n  • codebook_size: Input should be less than or equal "
         "to 32767 (got 100000)"),
    Case("tokenize-unknown-method", ["tokenize", "--method", "pq"], 2,
         "error: invalid tokenize config (1 error):\n  • method: Input should be 'rqvae' or 'rq-kmeans' "
         "(got 'pq')"),
    Case("tokenize-unknown-device", ["tokenize", "--device", "tpu"], 2,
         "error: invalid tokenize config (1 error):\n  • device: Input should be 'auto', 'cpu', 'cuda' or "
         "'mps' (got 'tpu')"),
    Case("tokenize-negative-epochs", ["tokenize", "--epochs", "-1"], 2,
         "error: invalid tokenize config (1 error):\n  • epochs: Input should be greater than or equal to "
         "0 (got -1)"),
    Case("tokenize-zero-width", ["tokenize", "--set", "hidden=[0]"], 2,
         "error: invalid tokenize config (1 error):\n  • tokenize: hidden widths must be >= 1 (got [0]); "
         "leave hidden unset for the default"),
    Case("tokenize-warm-start-missing", ["tokenize", "--warm-start", "{d}/nowhere"], 2,
         "error: --warm-start {d}/nowhere: no such workspace or file"),
    Case("tokenize-more-codes-than-items", ["tokenize", "--method", "rq-kmeans", "--levels", "1",
                                            "--codebook-size", "5000", "--device", "cpu", "--force"], 1,
         "error: k-means cannot initialise 5000 codes from 64 items\n  hint: lower --codebook-size to at "
         "most 64"),
    # train-bilevel
    Case("train-unknown-mode", ["train-bilevel", "--mode", "both"], 2,
         "error: invalid train-bilevel config (1 error):\n  • mode: Input should be 'fixed', 'joint' or "
         "'bilevel' (got 'both')"),
    Case("train-zero-epochs", ["train-bilevel", "--epochs", "0"], 2,
         "error: invalid train-bilevel config (1 error):\n  • epochs: Input should be greater than or "
         "equal to 1 (got 0)"),
    Case("train-zero-batch", ["train-bilevel", "--batch-size", "0"], 2,
         "error: invalid train-bilevel config (1 error):\n  • batch_size: Input should be greater than or "
         "equal to 1 (got 0)"),
    Case("train-negative-lr", ["train-bilevel", "--set", "train.lr=-1"], 2,
         "error: invalid train-bilevel config (1 error):\n  • train.lr: Input should be greater than 0 "
         "(got -1)"),
    Case("train-bad-time-budget", ["train-bilevel", "--set", "train.time_budget=soon"], 2,
         "error: invalid train-bilevel config (1 error):\n  • train.time_budget: time budget must be a "
         "duration like 90s, 20m or 1h30m (got 'soon')"),
    Case("train-freeze-everything", ["train-bilevel", "--set", "bilevel.freeze_last=1.0"], 2,
         "error: invalid train-bilevel config (1 error):\n  • bilevel.freeze_last: freeze_last is the "
         "share of the run at its end with the tokenizer frozen, 0 <= share < 1 (got 1.0): a freeze of "
         "the whole run is --mode fixed"),
    Case("train-zero-max-bad-steps", ["train-bilevel", "--set", "train.max_bad_steps=0"], 2,
         "error: invalid train-bilevel config (1 error):\n  • train.max_bad_steps: Input should be greater "
         "than or equal to 1 (got 0)"),
    Case("train-dropout-above-one", ["train-bilevel", "--set", "model.dropout=1.5"], 2,
         "error: invalid train-bilevel config (1 error):\n  • model.dropout: Input should be less than 1 "
         "(got 1.5)"),
    Case("train-resume-nothing", ["train-bilevel", *TRAIN, "--resume"], 2,
         "error: nothing to resume in {ws}: no interrupted run ({ws}/training/last.pt does not exist)\n  "
         "hint: start the run without --resume"),
    Case("train-warm-start-missing", ["train-bilevel", *TRAIN, "--set", "warm_start={d}/nö where"], 2,
         "error: --warm-start {d}/nö where: no such workspace or file"),
    Case("train-bilevel-on-kmeans", ["train-bilevel", *TRAIN[2:], "--mode", "bilevel", "--force"], 2,
         "error: --mode bilevel trains the tokenizer, but {ws}/tokenizer.pt is residual k-means, which "
         "has no trainable encoder\n  hint: re-run `bloger tokenize --method rqvae`, or train with --mode "
         "fixed"),
    # evaluate
    Case("evaluate-k-zero", ["evaluate", "--k", "0"], 2,
         "error: invalid evaluate config (1 error):\n  • k: every k must be at least 1 (got 0)"),
    Case("evaluate-k-not-a-list", ["evaluate", "--k", "ten"], 2,
         "error: invalid evaluate config (1 error):\n  • k: k must be comma-separated whole numbers like "
         "1,5,10,20 (got 'ten')"),
    Case("evaluate-unknown-split", ["evaluate", "--split", "train"], 2,
         "error: invalid evaluate config (1 error):\n  • split: Input should be 'test' or 'valid' (got "
         "'train')"),
    Case("evaluate-text-checkpoint", ["evaluate", "--checkpoint", "{d}/m.pt"], 2,
         "error: {d}/m.pt is not a readable checkpoint (UnpicklingError: Weights only load failed. In "
         "PyTorch 2.6, we changed the default value of the `weights_only` argument in `torch.load` from "
         "`False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
         "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a "
         "trusted source.)\n  hint: re-run `bloger train-bilevel --force`", text("m.pt", "weights")),
    Case("evaluate-missing-checkpoint", ["evaluate", "--checkpoint", "{d}/none.pt"], 1,
         "error: no checkpoint at {d}/none.pt\n  hint: run `bloger train-bilevel` first"),
    # export-ids
    Case("export-unknown-format", ["export-ids", "--out", "{d}/ids.xyz"], 2,
         "error: --out {d}/ids.xyz: cannot tell the format from suffix '.xyz'\n  hint: give --format "
         "parquet|csv|jsonl, or end the name in .parquet, .csv or .jsonl"),
    Case("export-compare-text", ["export-ids", "--out", "{d}/ids.csv", "--compare", "{d}/old.parquet"], 1,
         "error: --compare {d}/old.parquet: not a readable parquet file (Invalid Input Error: No magic "
         "bytes found at end of file '{d}/old.parquet')",
         text("old.parquet", "item_key,semantic_id\n")),
    # recommend
    Case("recommend-k-zero", ["recommend", "--out", "{d}/r.csv", "--k", "0"], 2,
         "error: --k 0: must be at least 1"),
    Case("recommend-unknown-users", ["recommend", "--out", "{d}/r.csv", "--users", "{d}/u.txt"], 1,
         "error: --users {d}/u.txt: none of its 1 user key(s) is a user of {ws} (nobody)\n  hint: give "
         "keys as the users file of `bloger prepare` has them",
         text("u.txt", "nobody\n")),
    Case("recommend-non-utf8-histories", ["recommend", "--out", "{d}/r.csv", "--histories", "{d}/h.jsonl"], 1,
         "error: --histories {d}/h.jsonl: not a readable jsonl file (Invalid Input Error: Malformed JSON "
         "in file \"{d}/h.jsonl\", at byte 15 in line 2: invalid UTF-8 encoding in string.)",
         text("h.jsonl", b'{"user_key": "\xff", "items": []}\n')),
    Case("recommend-text-model", ["recommend", "--out", "{d}/r.csv", "--model", "{d}/m.pt", "--histories",
                                  "{d}/h.jsonl"], 2,
         "error: --model {d}/m.pt is not a readable model file (UnpicklingError)\n  hint: write one with "
         "`bloger export-model --format torch`",
         lambda ws, d: (text("m.pt", "x")(ws, d), text("h.jsonl", '{"user_key": "a", "items": []}\n')(ws, d))),
    Case("recommend-out-exists", ["recommend", "--out", "{d}/r.csv"], 2,
         "error: --out {d}/r.csv exists\n  hint: give --force to replace it", text("r.csv", "keep me")),
    # status and runs
    Case("status-not-a-workspace", ["status", "-w", "{d}/nowhere"], 2,
         "error: {d}/nowhere is not a bloger workspace (no catalog.duckdb)\n  hint: run `bloger prepare` "
         "first"),
    Case("runs-unknown-status", ["runs", "--status", "exploded"], 2,
         "error: --status exploded: not a run status\n  hint: give one of done, failed, interrupted, "
         "running, killed"),
]


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.args[0] for c in CASES} >= {"prepare", "embed", "tokenize", "train-bilevel", "evaluate", "export-ids",
                                           "recommend", "status", "runs"}


@pytest.fixture
def workspace(trained_workspace_template: Path, tmp_path: Path) -> Path:
    """The trained tiny workspace, in a directory whose name has a space and a non-ASCII letter."""
    path = tmp_path / "wörk space"
    shutil.copytree(trained_workspace_template, path)
    return path


def current_artifacts(ws: Path) -> dict[str, str]:
    from bloger_cli.catalog import Catalog

    return {kind: row["content_hash"] for kind, row in Catalog(ws / "catalog.duckdb").current_artifacts().items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workspace: Path, tmp_path: Path, fails_cleanly) -> None:
    d = tmp_path / "files"
    d.mkdir()
    if case.setup is not None:
        case.setup(workspace, d)
    args = [a.format(ws=workspace, d=d) for a in case.args]
    if "-w" not in args and case.args[0] != "runs":
        args[1:1] = ["-w", str(workspace)]
    elif case.args[0] == "runs":
        args[1:1] = ["-w", str(workspace)]
    catalog = current_artifacts(workspace)
    message = fails_cleanly(workspace, case.code, *args, ignore=("catalog.duckdb", "catalog.duckdb.wal"))
    assert current_artifacts(workspace) == catalog
    assert message == case.expected.format(ws=workspace, d=d)
