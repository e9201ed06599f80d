"""`make -C pipelines synthetic`: every stage, both modes, the baselines, the results file and the HTML
report; re-running does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bloger_cli.runs import list_runs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")]

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def make(work: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("BLOGER_WORKSPACE", None)
    bin_dir = Path(sys.executable).parent
    return subprocess.run(["make", "-C", str(PIPELINES), "synthetic", f"WORK={work}", f"RESULTS={results}",
                           f"BLOGER={bin_dir / 'bloger'}"],
                          capture_output=True, text=True, env=env, timeout=1200)


def test_synthetic_reproduction_end_to_end_then_nothing_to_do(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    first = make(work, results)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    data = json.loads((results / "synthetic.json").read_text())
    assert [(r["mode"], r["seed"]) for r in data["runs"]] == [("fixed", 42), ("bilevel", 42)]
    for row in data["runs"]:
        assert 0 <= row["recall@10"] <= 1 and row["seconds_per_epoch"] > 0 and row["device"].startswith("cpu")
    assert [(r["mode"], r["seed"]) for r in data["baselines"]] == [("sasrec", 42), ("popularity", 42)]
    text = (results / "synthetic.md").read_text()
    assert "| fixed | 1 |" in text and "| bilevel | 1 |" in text and "do not edit" in text
    assert "| sasrec (baseline) | 1 |" in text and "| popularity (baseline) | 1 |" in text
    html = (work / "synthetic-report" / "report.html").read_text()
    assert all(f"<td>{run}</td>" in html for run in ("fixed-s42", "bilevel-s42", "sasrec-s42", "popularity-s42"))
    assert not (work / "synthetic-runs").exists()  # runs, not copies of the workspace
    assert {p.name for p in (work / "synthetic" / "runs").iterdir()} == {
        "fixed-s42", "bilevel-s42", "sasrec-s42", "popularity-s42"}
    counts = {ws: len(list_runs([ws])) for ws in [work / "synthetic"]}
    stamp = (results / "synthetic.md").stat().st_mtime_ns

    again = make(work, results)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {ws: len(list_runs([ws])) for ws in counts} == counts  # no stage ran again
    assert (results / "synthetic.md").stat().st_mtime_ns == stamp  # the results file was not rewritten
    # prepare, embed, tokenize, 2 x (train-bilevel, evaluate), 2 baselines
    assert again.stderr.count("is up to date") == 9


@pytest.mark.parametrize("resume", ["1", ""])
def test_resume_continues_only_the_runs_that_were_stopped(tmp_path: Path, resume: str) -> None:
    """RESUME=1 adds --resume where a run left training/last.pt (stopped by Ctrl-C or a kill), and only there."""
    work, log = tmp_path / "work", tmp_path / "calls.log"
    fake = tmp_path / "bloger"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    (work / "synthetic" / "runs" / "fixed-s42" / "training").mkdir(parents=True)
    (work / "synthetic" / "runs" / "fixed-s42" / "training" / "last.pt").touch()
    out = subprocess.run(["make", "-C", str(PIPELINES), "synthetic-train", f"WORK={work}", f"BLOGER={fake}",
                          f"RESUME={resume}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    trains = {line.split(" --run ")[1].split()[0]: line for line in log.read_text().splitlines()
              if line.startswith("train-bilevel")}
    assert set(trains) == {"fixed-s42", "bilevel-s42"}
    assert all(f" -w {work / 'synthetic'} " in line for line in trains.values())  # one workspace
    assert trains["fixed-s42"].endswith("--resume") == (resume == "1")
    assert "--resume" not in trains["bilevel-s42"]
