"""Non-finite steps: a step whose loss or gradient is NaN or inf never reaches the weights.

Every training step (the recommender's, the joint one, the bilevel meta step, the RQ-VAE's in
`tokenize`) checks its loss and gradients before the optimiser steps. A bad step is skipped: no
optimiser step, so neither the weights nor AdamW's moments change, and the gradients are dropped. It is
counted; `max_bad_steps` bad steps in a row stop the run with `Diverged`, before anything is saved, so
the last checkpoint written is the last good one. The check costs one host sync per step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from bloger_cli.errors import Diverged

log = logging.getLogger(__name__)


def finite(*values: Tensor) -> Tensor:
    """A 0-dim bool tensor: every element of every value is finite (no host sync)."""
    flags = [torch.isfinite(v.detach()).all() for v in values]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> Tensor:
    """The 2-norm of all existing gradients together (inf or NaN when any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@dataclass
class BadSteps:
    """Skipped steps of a run: in all, in the epoch in progress, and in a row (the stop rule)."""

    limit: int
    skipped: int = 0
    epoch: int = 0
    streak: int = 0

    def good(self) -> None:
        self.streak = 0

    def bad(self, where: str, hint: str) -> None:
        """Count a skipped step; `Diverged` when it is the `limit`-th in a row. `where` names the step
        ("step 12 (epoch 1)"), `hint` the fix (the rate and precision to lower)."""
        self.skipped, self.epoch, self.streak = self.skipped + 1, self.epoch + 1, self.streak + 1
        log.warning("%s: non-finite loss or gradient (NaN or inf), step skipped (%d in a row, %d in all)",
                    where, self.streak, self.skipped)
        if self.streak >= self.limit:
            raise Diverged(f"{where}: {self.streak} steps in a row had a non-finite loss or gradient (NaN or "
                           f"inf); stopped, nothing of this run replaced earlier artifacts", hint=hint)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped, "skipped_in_epoch": self.epoch, "bad_streak": self.streak}

    def load_state_dict(self, ckpt: dict[str, int]) -> None:
        self.skipped = int(ckpt.get("skipped_steps", 0))  # older checkpoints lack the counters
        self.epoch = int(ckpt.get("skipped_in_epoch", 0))
        self.streak = int(ckpt.get("bad_streak", 0))


def fix_hint(lr_key: str, lr: float, precision: str | None = None) -> str:
    """What to try after a divergence: a lower rate, and fp32 when the run is not in fp32 already."""
    fp32 = "" if precision in (None, "fp32") else " or set train.precision=fp32"
    return f"lower {lr_key} (now {lr:g}){fp32} and run again"
