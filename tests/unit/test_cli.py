"""The CLI in-process: help everywhere, --json, up-to-date re-runs, and one clear line per bad input.

Every bad input must give the exact message, the exit code of its error class (usage/config 2, data 1,
busy 3), no traceback, and leave an existing workspace's artifacts and catalog entries as they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from filelock import FileLock

from bloger_cli import __version__
from bloger_cli.catalog import Catalog
from bloger_cli.cli import app

NO_CORE = ["--min-user-interactions", "1", "--min-item-interactions", "1"]


# ------------------------------------------------------------------------------------------------ help


def all_commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    return dict(group.commands)


def test_app_help(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert "Usage: bloger [OPTIONS] COMMAND [ARGS]..." in result.stdout
    for name in all_commands():
        assert name in result.stdout
    for option in ("--version", "--verbose", "--quiet", "--debug"):
        assert option in result.stdout


def test_no_arguments_prints_help(cli):
    result = cli()
    assert result.exit_code == 2 and "Usage: bloger [OPTIONS] COMMAND [ARGS]..." in result.stdout


def test_commands_are_the_expected_ones():
    assert set(all_commands()) >= {"prepare", "status"}


@pytest.mark.parametrize("name", sorted(all_commands()))
def test_every_command_and_option_has_help(cli, name):
    command = all_commands()[name]
    assert command.help and command.help.strip(), f"`bloger {name}` has no help text"
    undocumented = [p.opts[0] for p in command.params if p.param_type_name == "option" and not (p.help or "").strip()]
    assert undocumented == [], f"`bloger {name}` options without help: {undocumented}"
    result = cli(name, "--help")
    assert result.exit_code == 0, result.output
    assert f"Usage: bloger {name} [OPTIONS]" in result.stdout
    assert command.help.split()[0] in result.stdout


def test_app_options_have_help():
    group = typer.main.get_command(app)
    assert group.help
    assert [p.opts[0] for p in group.params if p.param_type_name == "option" and not p.help] == []


def test_version(cli):
    result = cli("--version")
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"bloger {__version__}\n", "")


# -------------------------------------------------------------------------------------- happy paths


def test_prepare_json_is_one_object_on_stdout(cli, tiny_letter, tmp_path):
    result = cli("prepare", "-w", tmp_path / "ws", "--input", tiny_letter, *NO_CORE, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("}\n")
    out = json.loads(result.stdout)
    assert set(out) == {"stage", "run_id", "skipped", "result"}
    assert (out["stage"], out["skipped"]) == ("prepare", False)
    r = out["result"]
    assert (r["users"], r["items"], r["interactions"]) == (3, 5, 12)
    assert r["samples"] == {"train": 3, "valid": 3, "test": 3}
    assert result.stderr == ""  # no table, no progress bar when stderr is not a terminal


def test_prepare_renders_a_table_on_stderr(cli, tiny_letter, tmp_path):
    result = cli("prepare", "-w", tmp_path / "ws", "--input", tiny_letter, *NO_CORE)
    assert result.exit_code == 0 and result.stdout == ""
    for line in ("prepare: letter", "interactions", "samples train / valid / test (history <= 20)", "3 / 3 / 3",
                 "title, brand, categories"):
        assert line in result.stderr


def test_rerun_is_up_to_date_and_force_redoes_it(cli, tiny_letter, tmp_path):
    args = ("prepare", "-w", tmp_path / "ws", "--input", tiny_letter, *NO_CORE)
    first = json.loads(cli(*args, "--json").stdout)
    again = cli(*args)
    assert again.exit_code == 0
    assert f"prepare is up to date (run {first['run_id']}); use --force to redo it\n" in again.stderr
    again_json = json.loads(cli(*args, "--json").stdout)
    assert again_json["skipped"] and again_json["run_id"] == first["run_id"]
    assert again_json["result"] == first["result"]
    forced = json.loads(cli(*args, "--force", "--json").stdout)
    assert not forced["skipped"] and forced["run_id"] != first["run_id"]


def test_status_json_and_table(cli, tiny_letter, tmp_path):
    ws = tmp_path / "ws"
    run_id = json.loads(cli("prepare", "-w", ws, "--input", tiny_letter, *NO_CORE, "--json").stdout)["run_id"]
    result = cli("status", "-w", ws, "--json")
    assert result.exit_code == 0 and result.stdout.count("\n") == 1
    out = json.loads(result.stdout)
    assert out["workspace"] == str(ws)
    row, *later = out["stages"]
    assert (row["stage"], row["state"], row["reason"], row["run_id"]) == ("prepare", "done", "up to date", run_id)
    assert [(r["stage"], r["state"]) for r in later] == [
        ("embed", "missing"), ("tokenize", "missing"), ("train-bilevel", "missing"), ("evaluate", "missing"),
        ("baseline", "missing")]
    table = cli("status", "-w", ws)
    assert table.exit_code == 0 and "done" in table.stderr and table.stdout == ""


def test_options_come_from_a_config_file_and_set(cli, tiny_letter, tmp_path):
    cfg = tmp_path / "bloger.toml"
    cfg.write_text(f'[prepare]\ninput = "{tiny_letter}"\nmin_user_interactions = 1\nmin_item_interactions = 1\n'
                   'max_history = 9\n')
    out = json.loads(cli("prepare", "-w", tmp_path / "ws", "-c", cfg, "--max-history", "4", "--set",
                         "max_history=3", "--json").stdout)
    assert out["result"]["max_history"] == 3 and out["result"]["users"] == 3


# ---------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def ws(tiny_workspace) -> Path:
    """A workspace holding one good prepare run."""
    return tiny_workspace


def snapshot(ws: Path) -> tuple[dict[str, bytes], list, list]:
    """Parquet bytes, the catalog's current artifacts and its successful runs (one catalog connection)."""
    files = {p.name: p.read_bytes() for p in sorted(ws.glob("*.parquet"))}
    with Catalog(ws / "catalog.duckdb").connect(read_only=True) as con:
        current = con.execute("SELECT * FROM artifacts WHERE current ORDER BY kind").fetchall()
        done = con.execute("SELECT run_id FROM runs WHERE status = 'done' ORDER BY run_id").fetchall()
    return files, current, done


def check_error(result, exit_code: int, stderr: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit)  # raised by the boundary, not an escaped exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr == stderr


def run_bad(cli, ws: Path, *args: object, exit_code: int, stderr: str) -> None:
    """Run a failing prepare on the existing workspace and check it changed nothing there."""
    before = snapshot(ws)
    check_error(cli("prepare", "-w", ws, *args), exit_code, stderr)
    assert snapshot(ws) == before
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".") and "tmp" in p.name) in ([], [".duckdb-tmp"])
    # and the stage is still up to date on its old inputs
    row = json.loads(cli("status", "-w", ws, "--json").stdout)["stages"][0]
    assert row["state"] == "done"


def test_missing_file(cli, ws, tmp_path):
    path = tmp_path / "data" / "nope.inter.json"
    run_bad(cli, ws, "--input", path, *NO_CORE, exit_code=1,
            stderr=f"error: interactions file {path} does not exist\n")


def test_missing_items_file(cli, ws, tiny_letter, tmp_path):
    path = tmp_path / "nope.json"
    run_bad(cli, ws, "--input", tiny_letter, "--items", path, *NO_CORE, exit_code=1,
            stderr=f"error: item metadata file {path} does not exist\n")


def test_directory_without_letter_files(cli, ws, tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    run_bad(cli, ws, "--input", empty, *NO_CORE, exit_code=1,
            stderr=f"error: no LETTER interactions (*.inter.json) file (*.inter.json) in {empty}\n")


@pytest.mark.parametrize("source", ["letter", "table"])
def test_empty_file(cli, ws, tmp_path, source):
    path = tmp_path / ("empty.inter.json" if source == "letter" else "empty.csv")
    path.write_bytes(b"")
    cols = ["--user-col", "u", "--item-col", "i"] if source == "table" else []
    run_bad(cli, ws, "--source", source, "--input", path, *cols, *NO_CORE, exit_code=1,
            stderr=f"error: interactions file {path} is empty\n")


@pytest.mark.parametrize(("text", "detail"), [
    ('{"u1": [1, 2', "invalid JSON at line 1 column 13 (Expecting ',' delimiter)"),
    ('{"u1": [1, 2, 3],\n "u2": [4,]}', "invalid JSON at line 2 column 11 (Expecting value)"),
    ("not json", "invalid JSON at line 1 column 1 (Expecting value)"),
    ("[[1, 2, 3]]", "expected a JSON object {user: [item, ...]}, found list"),
    ('{"u1": 5}', "user 'u1' maps to int, expected a list of item ids"),
    ('{"u1": [1, "a"]}', None),
])
def test_bad_letter_json(cli, ws, tmp_path, text, detail):
    path = tmp_path / "bad.inter.json"
    path.write_text(text)
    if detail is None:  # mixed numbers and strings: pyarrow's own words follow
        before = snapshot(ws)
        result = cli("prepare", "-w", ws, "--input", path, *NO_CORE)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr.startswith(f"error: {path}: item ids must all be numbers or all strings (")
        assert result.stderr.count("\n") == 1 and snapshot(ws) == before
        return
    run_bad(cli, ws, "--input", path, *NO_CORE, exit_code=1, stderr=f"error: {path}: {detail}\n")


def test_bad_item_metadata_json(cli, ws, make_letter, tmp_path):
    path = make_letter({"a": [1, 2, 3]}, name="M")
    items = path.with_name("M.item.json")
    items.write_text('{"1": {"title": "x"')
    run_bad(cli, ws, "--input", path, *NO_CORE, exit_code=1,
            stderr=f"error: {items}: invalid JSON at line 1 column 20 (Expecting ',' delimiter)\n")


def test_csv_without_the_mapped_columns(cli, ws, make_csv):
    path = make_csv("t.csv", "a,b\n1,2")
    run_bad(cli, ws, "--source", "table", "--input", path, "--user-col", "user", "--item-col", "b", *NO_CORE,
            exit_code=1, stderr=f"error: {path}: no column 'user' (from --user-col); columns are a, b\n")


def test_csv_without_the_time_column(cli, ws, make_csv):
    path = make_csv("t.csv", "user,item\n1,2")
    run_bad(cli, ws, "--source", "table", "--input", path, "--user-col", "user", "--item-col", "item",
            "--time-col", "when", *NO_CORE,
            exit_code=1, stderr=f"error: {path}: no column 'when' (from --time-col); columns are user, item\n")


def test_non_numeric_timestamps(cli, ws, make_csv):
    path = make_csv("t.csv", "user,item,time\n1,a,1700000000\n1,b,yesterday\n1,c,2024-01-01")
    run_bad(cli, ws, "--source", "table", "--input", path, "--user-col", "user", "--item-col", "item",
            "--time-col", "time", *NO_CORE, exit_code=1,
            stderr=f"error: {path}: column 'time' has non-numeric timestamps (e.g. 'yesterday'); "
                   "expected numbers (epoch) or ISO-8601 dates\n")


def test_missing_timestamps(cli, ws, make_csv):
    path = make_csv("t.csv", "user,item,time\n1,a,1700000000\n1,b,\n1,c,1700000001")
    run_bad(cli, ws, "--source", "table", "--input", path, "--user-col", "user", "--item-col", "item",
            "--time-col", "time", *NO_CORE, exit_code=1,
            stderr=f"error: {path}: column 'time' is empty in 1 row(s) (the first is data row 2); "
                   "every interaction needs a time\n")


def test_unknown_table_format(cli, ws, make_csv):
    path = make_csv("t.xlsx", "user,item\n1,2")
    run_bad(cli, ws, "--source", "table", "--input", path, "--user-col", "user", "--item-col", "item", *NO_CORE,
            exit_code=1, stderr=f"error: {path}: unknown table format '.xlsx'\n"
                                "  hint: use one of .csv, .json, .jsonl, .ndjson, .parquet, .tsv, .txt\n")


UNKNOWN_KEY = ("error: invalid prepare config (1 error):\n"
               "  • {key}: unknown key (check the spelling; `bloger prepare --help` lists options)\n")


def test_unknown_key_via_set(cli, ws, tiny_letter):
    run_bad(cli, ws, "--input", tiny_letter, *NO_CORE, "--set", "min_users=3", exit_code=2,
            stderr=UNKNOWN_KEY.format(key="min_users"))


def test_unknown_nested_key_via_set(cli, ws, tiny_letter):
    run_bad(cli, ws, "--input", tiny_letter, *NO_CORE, "--set", "prepare.synthetic.user=3", exit_code=2,
            stderr=UNKNOWN_KEY.format(key="synthetic.user"))


def test_unknown_key_in_config_file(cli, ws, tiny_letter, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[prepare]\nmin_item_interaction = 1\n")
    run_bad(cli, ws, "--input", tiny_letter, "-c", cfg, exit_code=2,
            stderr=UNKNOWN_KEY.format(key="min_item_interaction"))


def test_unknown_section_in_config_file(cli, ws, tiny_letter, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[prepar]\nmax_history = 1\n")
    run_bad(cli, ws, "--input", tiny_letter, "-c", cfg, exit_code=2,
            stderr=f"error: config file {cfg}: unknown section(s) 'prepar'\n"
                   "  hint: sections are the stage names: prepare, embed, tokenize, train-bilevel, evaluate, "
                   "export-ids, recommend, export-model, baseline, report\n")


def test_stage_section_that_is_not_a_table(cli, ws, tiny_letter, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("prepare = 3\n")
    run_bad(cli, ws, "--input", tiny_letter, "-c", cfg, exit_code=2,
            stderr=f"error: config file {cfg}: [prepare] must be a table\n")


def test_brackets_in_paths_are_printed_as_they_are(cli, ws, tmp_path):
    path = tmp_path / "data[1]" / "[bold]nope.json"
    run_bad(cli, ws, "--input", path, *NO_CORE, exit_code=1,
            stderr=f"error: interactions file {path} does not exist\n")


def test_invalid_toml(cli, ws, tiny_letter, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[prepare]\nmax_history = \n")
    before = snapshot(ws)
    result = cli("prepare", "-w", ws, "--input", tiny_letter, "-c", cfg)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: config file {cfg} is not valid TOML: ")
    assert "line 2" in result.stderr and "Traceback" not in result.output and snapshot(ws) == before


def test_missing_config_file(cli, ws, tiny_letter, tmp_path):
    run_bad(cli, ws, "--input", tiny_letter, "-c", tmp_path / "none.toml", exit_code=2,
            stderr=f"error: config file {tmp_path / 'none.toml'} does not exist\n")


@pytest.mark.parametrize(("args", "stderr"), [
    (("--duplicates", "last"),
     "error: invalid prepare config (1 error):\n  • duplicates: Input should be 'first' or 'all' (got 'last')\n"),
    (("--min-user-interactions", "0", "--max-history", "0"),
     "error: invalid prepare config (2 errors):\n"
     "  • min_user_interactions: Input should be greater than or equal to 1 (got 0)\n"
     "  • max_history: Input should be greater than or equal to 1 (got 0)\n"),
    (("--source", "table"),
     "error: invalid prepare config (1 error):\n"
     "  • prepare: source 'table' needs both user_col and item_col (--user-col, --item-col)\n"),
    (("--set", "max_history"),
     "error: --set 'max_history': expected key=value, e.g. --set min_user_interactions=3\n"),
])
def test_invalid_values(cli, ws, tiny_letter, args, stderr):
    run_bad(cli, ws, "--input", tiny_letter, *args, exit_code=2, stderr=stderr)


def test_input_is_required(cli, ws):
    run_bad(cli, ws, exit_code=2, stderr="error: invalid prepare config (1 error):\n"
                                         "  • prepare: input is required when source is 'letter' (give --input PATH)\n")


def test_filter_that_leaves_no_users(cli, ws, tiny_letter):
    run_bad(cli, ws, "--input", tiny_letter, "--min-user-interactions", "6", "--min-item-interactions", "1",
            exit_code=1,
            stderr=f"error: {tiny_letter}: no interactions left after filtering (12 read; "
                   "k-core (users >= 6, items >= 1): -12)\n"
                   "  hint: lower --min-user-interactions / --min-item-interactions or --min-rating\n")
    [failed] = Catalog(ws / "catalog.duckdb").runs(status="failed")
    assert failed.error.startswith(f"{tiny_letter}: no interactions left after filtering")


def test_min_rating_without_ratings(cli, ws, tiny_letter):
    run_bad(cli, ws, "--input", tiny_letter, *NO_CORE, "--min-rating", "4", exit_code=2,
            stderr="error: min_rating is set (4.0) but source 'letter' has no ratings\n"
                   "  hint: drop --min-rating or map --rating-col\n")


def test_workspace_path_is_a_file(cli, tiny_letter, tmp_path):
    path = tmp_path / "ws.txt"
    path.write_bytes(b"mine")
    check_error(cli("prepare", "-w", path, "--input", tiny_letter, *NO_CORE), 2,
                f"error: workspace {path} is a file, not a directory\n  hint: give --workspace a directory path\n")
    check_error(cli("status", "-w", path), 2,
                f"error: workspace {path} is a file, not a directory\n  hint: give --workspace a directory path\n")
    assert path.read_bytes() == b"mine"


def test_busy_workspace(cli, ws, tiny_letter):
    before = snapshot(ws)
    with FileLock(str(ws / ".bloger.lock")):
        result = cli("prepare", "-w", ws, "--input", tiny_letter, *NO_CORE, "--force", "--lock-timeout", "0.1")
    check_error(result, 3, f"error: workspace {ws} is in use by another bloger process (waited 0.1s)\n"
                           "  hint: wait for it to finish or raise --lock-timeout\n")
    assert snapshot(ws) == before


def test_failed_first_run_leaves_no_workspace(cli, tiny_letter, tmp_path):
    path = tmp_path / "fresh"
    result = cli("prepare", "-w", path, "--input", tiny_letter)  # the default 5-core removes everything
    assert result.exit_code == 1 and not path.exists()


def test_status_of_a_directory_that_is_not_a_workspace(cli, tmp_path):
    check_error(cli("status", "-w", tmp_path), 2,
                f"error: {tmp_path} is not a bloger workspace (no catalog.duckdb)\n"
                "  hint: run `bloger prepare` first\n")


def test_json_mode_errors_keep_stdout_empty(cli, ws, tmp_path):
    result = cli("prepare", "-w", ws, "--input", tmp_path / "none.json", "--json")
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.startswith("error: ")


def test_debug_reraises_with_a_traceback(tiny_letter, tmp_path):
    """--debug lets the exception through: the interpreter prints the full traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "bloger_cli", "--debug", "prepare", "-w", str(tmp_path / "ws"),
         "--input", str(tiny_letter)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback (most recent call last):" in proc.stderr
    assert proc.stderr.rstrip().endswith(
        f"bloger_cli.errors.DataError: {tiny_letter}: no interactions left after filtering (12 read; "
        "k-core (users >= 5, items >= 5): -12); lower --min-user-interactions / --min-item-interactions or "
        "--min-rating")


def test_debug_in_process_raises_the_library_error(cli, tiny_letter, tmp_path):
    from bloger_cli.errors import DataError

    result = cli("--debug", "prepare", "-w", tmp_path / "ws", "--input", tiny_letter)
    assert result.exit_code == 1 and isinstance(result.exception, DataError)
    # and the next invocation without --debug is back to one line
    result = cli("prepare", "-w", tmp_path / "ws", "--input", tiny_letter)
    assert isinstance(result.exception, SystemExit) and result.stderr.startswith("error: ")
