"""When things happen in a run (docs/design.md §4.2): how long it lasts, the learning rate along the way,
and which steps validate or update the tokenizer.

A run ends at the first of: `epochs` epochs, `train.max_steps` steps, `train.time_budget` seconds of
wall time, or early stopping. Its progress is the larger of steps / total steps and elapsed / budget,
and the learning rate and the tokenizer's freeze follow the progress, so a 20-minute budget gets a
warm-up, a plateau and a decay of 20 minutes whatever an epoch costs on the machine.

Re-coding is a shock to the recommender (one Beauty meta step re-codes 10-40% of items), so a
tokenizer update never falls fewer than `settle_steps` steps before a validation: best.pt, early
stopping and the end of the run only ever see a recommender that trained on the codes it is judged by.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bloger_cli.config import TrainBilevelConfig, TrainConfig


def lr_factor(step: int, cfg: TrainConfig, total_steps: int, time_progress: float = 0.0) -> float:
    """Linear warmup to 1 over `warmup_steps`, the full rate until `decay_start` of the run, then cosine
    or linear decay to 0 at its end (or constant). The run's progress is the larger of the step count's
    and `time_progress` (elapsed / time budget)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = max(time_progress, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    progress = min(1.0, max(0.0, progress - cfg.decay_start) / (1.0 - cfg.decay_start))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress


class Clock:
    """Wall time of a run across resumes: `elapsed()` counts from the first start, minus the gaps."""

    def __init__(self, before: float = 0.0) -> None:
        self.before = before
        self.started = time.perf_counter()

    def restart(self, before: float) -> None:
        self.before, self.started = before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started


@dataclass
class Plan:
    """The run's length and its validation and tokenizer-update steps. Steps are 0-based global steps
    ("after step s" = after s + 1 optimiser steps); `in_epoch` is the step's index within its epoch."""

    cfg: TrainBilevelConfig
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return total if self.cfg.train.max_steps is None else min(total, self.cfg.train.max_steps)

    @property
    def settle(self) -> int:
        settle = self.cfg.bilevel.settle_steps
        return self.steps_per_epoch // 8 if settle is None else settle

    def progress(self, steps_done: int, elapsed: float) -> float:
        budget = self.cfg.train.time_budget
        return max(steps_done / max(1, self.total_steps), elapsed / budget if budget else 0.0)

    def time_progress(self, elapsed: float) -> float:
        budget = self.cfg.train.time_budget
        return elapsed / budget if budget else 0.0

    def finished(self, steps_done: int, elapsed: float) -> bool:
        budget = self.cfg.train.time_budget
        return steps_done >= self.total_steps or (budget is not None and elapsed >= budget)

    def validates_after(self, step: int, epoch: int) -> bool:
        """Whether the schedule validates after global step `step` of epoch `epoch` (1-based)."""
        every = self.cfg.train.eval_every_steps
        if every is not None:
            return (step + 1) % every == 0
        return (step + 1) % self.steps_per_epoch == 0 and epoch % self.cfg.train.eval_every == 0

    def steps_to_validation(self, step: int, epoch: int) -> int:
        """Steps from after `step` up to and including the next scheduled validation (0: right after it)."""
        every = self.cfg.train.eval_every_steps
        if every is not None:
            return (-(step + 1)) % every
        epoch_end = epoch * self.steps_per_epoch - 1
        while (epoch % self.cfg.train.eval_every) != 0:
            epoch, epoch_end = epoch + 1, epoch_end + self.steps_per_epoch
        return epoch_end - step

    def update_due(self, step: int, epoch: int, elapsed: float) -> bool:
        """Bilevel: whether a tokenizer update follows global step `step`: on the schedule (every
        `tokenizer_every` steps, or `updates_per_epoch` spread over each epoch by `placement`), not in
        the frozen end of the run, and not within `settle` steps of the next validation or the last step."""
        b = self.cfg.bilevel
        spe = self.steps_per_epoch
        if b.tokenizer_every is not None:
            scheduled = (step + 1) % b.tokenizer_every == 0
        else:
            u = min(b.updates_per_epoch, spe)
            starts = {j * spe // u for j in range(u)} if b.placement == "start" else \
                {(j + 1) * spe // u - 1 for j in range(u)}
            scheduled = step % spe in starts
        if not scheduled or self.progress(step + 1, elapsed) >= 1.0 - b.freeze_last:
            return False
        room = min(self.steps_to_validation(step, epoch), self.total_steps - 1 - step)
        return room >= self.settle
