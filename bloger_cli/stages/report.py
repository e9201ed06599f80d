"""`bloger report`'s library function: collect the runs, draw the figures, write the page."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bloger_cli.errors import ConfigError
from bloger_cli.report.collect import collect_runs, config_differences, shared_ks, summarize_modes, tokenize_before
from bloger_cli.report.config import ReportConfig
from bloger_cli.report.figures import FIGURES, require_matplotlib
from bloger_cli.report.html import page
from bloger_cli.report.results import results_data, write_if_changed, write_results

log = logging.getLogger(__name__)


def run(cfg: ReportConfig, roots: list[Path], *, force: bool = False) -> dict[str, Any]:
    """Write OUT/report.html and OUT/*.png (and RESULTS/NAME.md/.json when cfg.results is set)."""
    out = Path(cfg.out)
    if out.exists() and not force:
        raise ConfigError(f"output directory {out} already exists",
                          hint="pass --force to write the report into it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    require_matplotlib()
    runs = collect_runs(roots)
    ks, notes = shared_ks(runs)
    for run in runs:
        notes.extend(run.notes)
    figures = {}
    for name, (title, caption, draw) in FIGURES.items():
        png = draw(runs, notes)
        if png is not None:
            figures[name] = (title, caption, png)
    more = f" and {len(roots) - 1} more" if len(roots) > 1 else ""
    title = cfg.name or f"bloger report: {roots[0].name}{more}"
    html = page(title, runs, ks, summarize_modes(runs, ks), figures, config_differences(runs), notes)
    out.mkdir(parents=True, exist_ok=True)
    written = [name for name, (*_, png) in figures.items() if write_if_changed(out / name, png)]
    written += ["report.html"] if write_if_changed(out / "report.html", html) else []
    result = {"report": str(out / "report.html"), "runs": [r.label for r in runs], "figures": list(figures),
              "k": ks, "notes": notes, "written": written}
    if cfg.results is not None:
        name = cfg.name or roots[0].name
        data = results_data(name, runs, tokenize_before(roots), cfg.train_flags)
        result["results"] = [str(p) for p in write_results(Path(cfg.results), data)]
    log.info("report: %s (%d runs, %d figures)", out / "report.html", len(runs), len(figures))
    return result
