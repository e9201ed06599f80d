"""What the training loop works on: the data (`TrainData`) and everything a checkpoint restores
(`TrainState`), with the optimisers and the learning-rate schedule built for a run's `Plan`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bloger_cli.config import TrainBilevelConfig
from bloger_cli.config_base import MAX_BAD_STEPS
from bloger_cli.data.samples import Samples
from bloger_cli.nonfinite import BadSteps
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import Vocab
from bloger_cli.tokenizer.rqvae import RQVAE
from bloger_cli.training.checkpoint import rng_state, set_rng_state
from bloger_cli.training.distributed import Distributed
from bloger_cli.training.schedule import Clock, Plan, lr_factor
from bloger_cli.training.tracker import Tracker


@dataclass
class TrainData:
    """What the loop trains and validates on; `codes` are the current semantic IDs (N, L')."""

    train: Samples
    valid: Samples
    codes: Tensor
    item_ids: Tensor  # (N,) the item id of each row of `codes` (0..N-1 after prepare)
    vocab: Vocab
    embeddings: Tensor | None = None  # (N, D) item text embeddings on the device: joint and bilevel modes
    train_lengths: Tensor | None = None  # (S,) history length of each training sample, on the CPU
    item_weights: Tensor | None = None  # (N,) training occurrences of each item (churn weighted by popularity)

    def __post_init__(self) -> None:
        if self.train_lengths is None:
            self.train_lengths = self.train.lengths().cpu()

    def to(self, device: torch.device) -> TrainData:
        """The training samples, codes and embeddings on `device` (validation decodes in CPU-sized batches
        and moves them itself)."""
        return TrainData(Samples(*(t.to(device) for t in self.train)), self.valid, self.codes.to(device),
                         self.item_ids, self.vocab, None if self.embeddings is None else self.embeddings.to(device),
                         self.train_lengths, self.item_weights)


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    model: Recommender
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: Plan
    clock: Clock = field(default_factory=Clock)
    epoch: int = 0  # epochs completed
    step: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    best_step: int = 0
    epoch_step: int = 0  # steps done in the epoch in progress (a run stopped mid-epoch resumes there)
    epoch_loss: float = 0.0  # that epoch's loss sum and seconds so far
    epoch_seconds: float = 0.0
    bad_evals: int = 0
    last_update: int = -1  # the global step after which the tokenizer last changed the codes (-1: never)
    tokenizer_updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch, eval and tokenizer-update rows
    tokenizer: RQVAE | None = None  # trained in modes joint and bilevel
    tokenizer_optimizer: torch.optim.Optimizer | None = None
    codes_before: Tensor | None = None  # bilevel: the IDs before the last tokenizer update (CPU, int32)
    dist: Distributed = field(default_factory=Distributed)  # under torchrun: this process's rank
    # what the ordinary step calls instead of `model`: its DDP wrapper or torch.compile'd forward (None: model)
    net: Callable[..., Any] | None = None
    bad: BadSteps = field(default_factory=lambda: BadSteps(MAX_BAD_STEPS))  # steps skipped as non-finite
    tracker: Tracker | None = None  # train.tracker: mirrors each history row as it is recorded
    tracker_run: str = ""  # the tracker's directory name: the first run ID, kept by a resumed run

    def record(self, row: dict[str, Any]) -> None:
        """Add a row (epoch, eval or tokenizer update) to the history, and to the tracker if there is one."""
        self.history.append(row)
        if self.tracker is not None:
            self.tracker.log(row)

    @property
    def forward(self) -> Callable[..., Any]:
        return self.model if self.net is None else self.net

    _SCALARS = ("epoch", "step", "best", "best_epoch", "best_step", "bad_evals", "epoch_step", "epoch_loss",
                "epoch_seconds", "last_update", "tokenizer_updates", "tracker_run")

    def state_dict(self) -> dict[str, Any]:
        out = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scheduler": self.scheduler.state_dict(), "history": self.history, "rng": rng_state(),
               "elapsed": self.clock.elapsed(), **{name: getattr(self, name) for name in self._SCALARS},
               **self.bad.state_dict()}
        if self.tokenizer is not None and self.tokenizer_optimizer is not None:
            out["tokenizer_state"] = {k: v.detach().cpu() for k, v in self.tokenizer.state_dict().items()}
            out["tokenizer_optimizer"] = self.tokenizer_optimizer.state_dict()
        if self.codes_before is not None:
            out["codes_before_update"] = self.codes_before
        return out

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        for name in self._SCALARS:
            if name in ckpt:  # checkpoints of older versions lack the newer counters
                setattr(self, name, type(getattr(self, name))(ckpt[name]))
        self.history = list(ckpt["history"])
        self.bad.load_state_dict(ckpt)
        self.clock.restart(float(ckpt.get("elapsed", 0.0)))
        self.codes_before = ckpt.get("codes_before_update")
        if self.tokenizer is not None and self.tokenizer_optimizer is not None:
            self.tokenizer.load_state_dict(ckpt["tokenizer_state"])
            self.tokenizer_optimizer.load_state_dict(ckpt["tokenizer_optimizer"])
        set_rng_state(ckpt["rng"])


def new_state(model: Recommender, cfg: TrainBilevelConfig, steps_per_epoch: int,
              tokenizer: RQVAE | None = None) -> TrainState:
    """Fresh optimisers (AdamW, no weight decay on norms) and the schedule over the run's plan. The
    tokenizer's optimiser lives as long as the run: its moments carry over from one meta step to the next."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr)
    plan, clock = Plan(cfg, steps_per_epoch), Clock()
    total = plan.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train, total, plan.time_progress(clock.elapsed())))
    bad = BadSteps(cfg.train.max_bad_steps)
    if cfg.mode == "fixed" or tokenizer is None:
        return TrainState(model, optimizer, scheduler, plan, clock, bad=bad)
    tok_optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=cfg.bilevel.tokenizer_lr,
                                      weight_decay=cfg.bilevel.tokenizer_weight_decay)
    return TrainState(model, optimizer, scheduler, plan, clock, tokenizer=tokenizer.train(),
                      tokenizer_optimizer=tok_optimizer, bad=bad)
