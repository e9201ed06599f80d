"""Experiment tracking: `train.tracker = "tensorboard"` mirrors every history row of a train-bilevel run, as
it is recorded, as TensorBoard scalars in `WORKSPACE/tensorboard/[NAME/]RUN/` (`tensorboard --logdir
WORKSPACE/tensorboard`). history.parquet stays the record; the tracker is a view of it while the run goes.

Tags, each at the row's global step: `train/<key>` for epoch rows (loss, lr, seconds, samples/s, ...),
`val/recall_10` and `val/ndcg_10` for every validation (end of epoch and mid-epoch), and
`tokenizer/<key>` for the bilevel and joint tokenizer updates (churn, collision rate, conflict fraction,
losses, cosines, ...). A resumed run writes to the same directory and hides what the killed run wrote
after its last checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from bloger_cli.errors import ConfigError

TRACKER_DIR = "tensorboard"  # under the workspace root: one folder per run name, one per run in it
SKIPPED = frozenset({"event", "epoch", "step"})  # the row's position, not a measurement


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> list[tuple[str, float]]:
    """A history row as (tag, value) pairs: its numbers (not None, not bool), under the event's section."""
    event = row.get("event", "epoch")
    out: list[tuple[str, float]] = []
    for key, value in row.items():
        if key in SKIPPED or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("val_"):
            tag = f"val/{key[4:]}"
        elif event == "tokenizer_update":
            tag = f"tokenizer/{key}"
        elif event == "eval":
            tag = f"eval/{key}"
        else:
            tag = f"train/{key}"
        out.append((tag, float(value)))
    return out


class TensorBoardTracker:
    """Writes each row's scalars to an event file in `directory` and flushes: a crash loses nothing logged."""

    def __init__(self, directory: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module needs the tensorboard package
            raise ConfigError("train.tracker = 'tensorboard' needs the tensorboard package",
                              hint="pip install 'bloger[tensorboard]', or set train.tracker = 'none'") from None
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        for tag, value in scalars(row):
            if math.isfinite(value):  # TensorBoard plots a NaN as a gap at best; the history keeps it
                self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, directory: Path, purge_step: int | None = None) -> Tracker | None:
    """The tracker `train.tracker` names (None for "none"; the config admits no other names)."""
    return None if kind == "none" else TensorBoardTracker(directory, purge_step)
