"""`bloger report`: the HTML page and figures of several workspaces' runs, the results file, bad input."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tiny_train_config

pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")

NAMES = ("fixed-s42", "fixed-s43", "bilevel-s42", "sasrec-s42", "popularity")


@pytest.fixture(scope="session")
def report_workspaces(trained_workspace_template: Path, rqvae_workspace_template: Path,
                      items64_workspace_template: Path, tmp_path_factory) -> dict[str, Path]:
    """Two fixed runs (seeds 42, 43) and a bilevel run, all evaluated; a SASRec and a popularity baseline."""
    from bloger_cli.baseline.config import BaselineConfig, SASRecConfig
    from bloger_cli.config import EvaluateConfig
    from bloger_cli.stages import baseline, train
    from bloger_cli.stages import evaluate as evaluation
    from bloger_cli.workspace import Workspace

    root = tmp_path_factory.mktemp("report")
    spaces = {name: root / name for name in NAMES}
    shutil.copytree(trained_workspace_template, spaces["fixed-s42"])
    shutil.copytree(trained_workspace_template, spaces["fixed-s43"])
    train.run(tiny_train_config(seed=43), Workspace(spaces["fixed-s43"]), force=True)
    shutil.copytree(rqvae_workspace_template, spaces["bilevel-s42"])
    train.run(tiny_train_config(mode="bilevel", bilevel={"updates_per_epoch": 2, "tokenizer_lr": 0.05}),
              Workspace(spaces["bilevel-s42"]))
    for name in ("fixed-s42", "fixed-s43", "bilevel-s42"):
        evaluation.run(EvaluateConfig(device="cpu"), Workspace(spaces[name]))
    shutil.copytree(items64_workspace_template, spaces["sasrec-s42"])
    sasrec = SASRecConfig(layers=1, heads=2, hidden=16, inner=32, dropout=0.0, lr=3e-3)
    baseline.run(BaselineConfig(epochs=2, batch_size=64, device="cpu", sasrec=sasrec), Workspace(spaces["sasrec-s42"]))
    shutil.copytree(items64_workspace_template, spaces["popularity"])
    baseline.run(BaselineConfig(model="popularity"), Workspace(spaces["popularity"]))
    return spaces


@pytest.fixture
def copy(report_workspaces: dict[str, Path], tmp_path: Path):
    """`copy("fixed-s42")`: a private copy of one of the report workspaces."""
    def make(name: str) -> Path:
        path = tmp_path / "copies" / name
        shutil.copytree(report_workspaces[name], path)
        return path
    return make


def workspace_args(spaces: dict[str, Path], names=NAMES) -> list[object]:
    return [arg for name in names for arg in ("-w", spaces[name])]


def check_error(result, exit_code: int, stderr: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr == stderr


def test_report_of_every_kind_of_run(report_workspaces, tmp_path: Path, cli) -> None:
    out = tmp_path / "report"
    result = cli("report", *workspace_args(report_workspaces), "--out", out, "--name", "tiny", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["runs"] == list(NAMES) and data["k"] == [1, 5, 10, 20]
    assert data["figures"] == ["training.png", "tokenizer.png", "codebook.png"]
    assert sorted(p.name for p in out.iterdir()) == ["codebook.png", "report.html", "tokenizer.png", "training.png"]
    for name in data["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    for name in NAMES:
        assert f"<td>{name}</td>" in html
    assert html.count("src='data:image/png;base64,") == 3  # self-contained
    assert "<td>fixed</td><td>2</td>" in html and " ± " in html  # two seeds: mean ± 95% interval
    assert "<h2>Configs that differ between runs</h2>" in html and "<td>seed</td>" in html

    again = cli("report", *workspace_args(report_workspaces), "--out", out, "--name", "tiny", "--force", "--json")
    assert json.loads(again.stdout)["written"] == []  # the same runs: every file left alone


def test_interval_is_student_t() -> None:
    from bloger_cli.report.collect import interval95

    mean, half = interval95([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(interval95([0.5])[1])


def test_results_file_of_a_reproduction(report_workspaces, tmp_path: Path, cli) -> None:
    result = cli("report", *workspace_args(report_workspaces), "--out", tmp_path / "r", "--name", "tiny",
                 "--results", tmp_path / "results", "--train-flags", "--epochs 2")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert [(r["mode"], r["seed"]) for r in data["runs"]] == [("fixed", 42), ("fixed", 43), ("bilevel", 42)]
    assert [(r["mode"], r["seed"]) for r in data["baselines"]] == [("sasrec", 42), ("popularity", 42)]
    assert data["summary"]["fixed"]["seeds"] == 2 and data["train_flags"] == "--epochs 2"
    text = (tmp_path / "results" / "tiny.md").read_text()
    assert "| fixed | 2 |" in text and "| sasrec (baseline) | 1 |" in text and "do not edit" in text


def test_a_workspace_with_no_runs_says_what_to_run_first(tiny_workspace: Path, tmp_path: Path, cli) -> None:
    check_error(cli("report", "-w", tiny_workspace, "--out", tmp_path / "r"), 1,
                f"error: {tiny_workspace} has no finished training or baseline run to report\n"
                f"  hint: run `bloger train-bilevel -w {tiny_workspace}` (then `bloger evaluate`) or "
                f"`bloger baseline -w {tiny_workspace}` first\n")
    assert not (tmp_path / "r").exists()


def test_an_existing_output_directory_needs_force(report_workspaces, tmp_path: Path, cli) -> None:
    out = tmp_path / "r"
    out.mkdir()
    check_error(cli("report", "-w", report_workspaces["popularity"], "--out", out), 2,
                f"error: output directory {out} already exists\n"
                "  hint: pass --force to write the report into it, or choose another --out\n")
    assert list(out.iterdir()) == []


def test_runs_that_share_no_k(report_workspaces, copy, tmp_path: Path, cli) -> None:
    fixed = copy("fixed-s42")
    assert cli("evaluate", "-w", fixed, "--k", "5", "--set", "device=cpu").exit_code == 0
    pop = copy("popularity")
    assert cli("baseline", "-w", pop, "--model", "popularity", "--k", "20").exit_code == 0
    check_error(cli("report", "-w", fixed, "-w", pop, "--out", tmp_path / "r"), 1,
                "error: the runs share no cut-off K (fixed-s42 has K = 5; popularity has K = 20)\n"
                "  hint: re-run `bloger evaluate --k` or `bloger baseline --k` with a common list\n")


def test_some_k_not_shared_are_left_out_with_a_note(report_workspaces, copy, tmp_path: Path, cli) -> None:
    fixed = copy("fixed-s42")
    assert cli("evaluate", "-w", fixed, "--k", "5,10", "--set", "device=cpu").exit_code == 0
    result = cli("report", "-w", fixed, "-w", report_workspaces["popularity"], "--out", tmp_path / "r", "--json")
    data = json.loads(result.stdout)
    assert data["k"] == [5, 10]
    assert "K = 1, 20 left out of the metrics table: not every run has them" in data["notes"]


def test_an_older_history_skips_that_plot_with_a_note(report_workspaces, copy, tmp_path: Path, cli) -> None:
    old = copy("fixed-s42")
    table = pq.read_table(old / "history.parquet")
    pq.write_table(table.drop_columns(["val_recall_10", "val_ndcg_10"]), old / "history.parquet")
    result = cli("report", "-w", old, "-w", report_workspaces["sasrec-s42"], "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    note = ("note: fixed-s42: its history has no val_ndcg_10 column (an older format); the plots that need it "
            "are skipped for this run\n")
    assert note in result.stderr
    assert (tmp_path / "r" / "training.png").is_file()


def test_without_matplotlib_says_how_to_get_it(report_workspaces, tmp_path: Path, cli, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as when not installed
    check_error(cli("report", "-w", report_workspaces["popularity"], "--out", tmp_path / "r"), 1,
                "error: bloger report needs matplotlib, which is not installed\n"
                "  hint: pip install 'bloger[plot]' (or: pip install 'matplotlib>=3.7')\n")


def test_evaluate_shows_the_best_baseline_of_its_workspace(report_workspaces, copy, cli) -> None:
    ws = copy("fixed-s42")
    assert cli("baseline", "-w", ws, "--model", "popularity").exit_code == 0
    result = cli("evaluate", "-w", ws, "--force", "--set", "device=cpu", "--json")
    out = json.loads(result.stdout)["result"]
    assert out["baseline"]["model"] == "popularity" and out["baseline"]["metrics"] == out["popularity"]
    table = cli("evaluate", "-w", ws, "--force", "--set", "device=cpu")
    header = [line for line in table.stderr.splitlines() if line.startswith("┏")][-1]  # the metrics table
    assert header.count("┳") == 6  # K, recall, ndcg, popularity x 2, the best baseline x 2
