"""`[report]`: the report command's config (registered in config.STAGE_CONFIGS)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from bloger_cli.config_base import StrictModel


class ReportConfig(StrictModel):
    """`bloger report`: an HTML report (and PNG figures) of the runs of one or several workspaces."""

    unhashed = frozenset({"out", "results"})

    out: Path = Field(..., description="output directory of report.html and the figures")
    name: str | None = Field(None, description="title (default: the first workspace's name)")
    results: Path | None = Field(None, description="also write RESULTS/NAME.md and .json (pipelines)")
    train_flags: str = Field("", description="the TRAIN_FLAGS the runs were made with, to record")
