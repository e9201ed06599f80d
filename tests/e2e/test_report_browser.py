"""`bloger report` seen as a person sees it: the page in headless Chromium shows every run's name and
its figures load (each <img> has a natural width), and a screenshot is taken for a human look."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_train_config

pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                "(Debian: apt-get install chromium)")

# appended to a copy of the page: lists what the browser made of it, for --dump-dom to print
PROBE = """<script>window.addEventListener('load', () => {
  const out = {images: [...document.images].map(i => [i.dataset.file, i.complete, i.naturalWidth]),
               text: document.body.innerText};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def test_the_page_shows_every_run_and_its_figures(trained_workspace_template: Path, rqvae_workspace_template: Path,
                                                  items64_workspace_template: Path, tmp_path: Path, cli) -> None:
    from bloger_cli.stages import train
    from bloger_cli.workspace import Workspace

    fixed, bilevel, sasrec = tmp_path / "fixed-s42", tmp_path / "bilevel-s42", tmp_path / "sasrec-s42"
    shutil.copytree(trained_workspace_template, fixed)
    shutil.copytree(rqvae_workspace_template, bilevel)
    train.run(tiny_train_config(mode="bilevel", bilevel={"updates_per_epoch": 2, "tokenizer_lr": 0.05}),
              Workspace(bilevel))
    shutil.copytree(items64_workspace_template, sasrec)
    for ws in (fixed, bilevel):
        assert cli("evaluate", "-w", ws, "--set", "device=cpu").exit_code == 0
    assert cli("baseline", "-w", sasrec, "--epochs", "2", "--device", "cpu", "--set", "sasrec.hidden=16").exit_code == 0
    out = tmp_path / "report"
    result = cli("report", "-w", fixed, "-w", bilevel, "-w", sasrec, "--out", out)
    assert result.exit_code == 0, result.output

    probe = tmp_path / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))
    for name in ("fixed-s42", "bilevel-s42", "sasrec-s42"):
        assert name in seen["text"]
    assert [file for file, _, _ in seen["images"]] == ["training.png", "tokenizer.png", "codebook.png"]
    assert all(complete and width > 300 for _, complete, width in seen["images"]), seen["images"]

    shot = out / "screenshot.png"  # for a person to look at (kept beside the report)
    taken = chromium(f"--screenshot={shot}", "--window-size=1200,2600", (out / "report.html").as_uri())
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
