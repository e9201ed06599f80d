"""The one training loop (DESIGN.md section 1), parameterised by mode.

Every mode runs the same epochs: shuffle the training samples (a permutation seeded by seed and
epoch, so a resumed run sees the same order), build each batch from the current semantic IDs with
tensor ops, take a step, validate by constrained decoding every `eval_every` epochs, keep the best
weights by the validation metric, stop early after `patience` validations without improvement, and
write `last.pt` (and `best.pt` when it improved) atomically after every epoch.

What differs between modes is the step: `fixed` (TIGER) updates the recommender only and the
tokenizer stays frozen; `joint` updates both every step on L_rec + lam * L_tok through the mixed
representation; `bilevel` takes the fixed step every step and, `updates_per_epoch` times an epoch (or
every `tokenizer_every` steps), the meta step of `training/bilevel.py`. After every tokenizer update
all items' codes are recomputed in place (`data.codes`), so the next batch, the validation's decoding
constraints and the checkpoint follow the new tokenizer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bloger_cli.config import TrainBilevelConfig, TrainConfig
from bloger_cli.training.bilevel import distinct_items, joint_loss, meta_gradients
from bloger_cli.tokenizer.semantic_ids import semantic_ids
from bloger_cli.evaluation import decode_ranks
from bloger_cli.metrics import summarize
from bloger_cli.progress import Bar
from bloger_cli.recommender.decoding import PrefixIndex
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import Vocab
from bloger_cli.training.checkpoint import rng_state, set_rng_state
from bloger_cli.training.data import Batch, Samples, make_batch
from bloger_cli.training.distributed import Distributed, Part

log = logging.getLogger(__name__)

VAL_K = 10  # validation metrics are @10 (DESIGN section 3)


@dataclass
class TrainData:
    """What the loop trains and validates on; `codes` are the current semantic IDs (N, L')."""

    train: Samples
    valid: Samples
    codes: Tensor
    item_ids: Tensor  # (N,) the item id of each row of `codes` (0..N-1 after prepare)
    vocab: Vocab
    embeddings: Tensor | None = None  # (N, D) item text embeddings on the device: joint and bilevel modes


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    model: Recommender
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0  # epochs completed
    step: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    epoch_step: int = 0  # steps done in the epoch in progress (a run stopped mid-epoch resumes there)
    epoch_loss: float = 0.0  # that epoch's loss sum and seconds so far
    epoch_seconds: float = 0.0
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch rows and tokenizer-update rows
    tokenizer: nn.Module | None = None  # trained in modes joint and bilevel
    tokenizer_optimizer: torch.optim.Optimizer | None = None
    dist: Distributed = field(default_factory=Distributed)  # under torchrun: this process's rank
    net: nn.Module | None = None  # the DDP wrapper of `model` the ordinary step runs (None: one process)

    @property
    def forward(self) -> nn.Module:
        return self.model if self.net is None else self.net

    def state_dict(self) -> dict[str, Any]:
        out = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
               "best": self.best, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals,
               "history": self.history, "rng": rng_state(), "epoch_step": self.epoch_step,
               "epoch_loss": self.epoch_loss, "epoch_seconds": self.epoch_seconds}
        if self.tokenizer is not None and self.tokenizer_optimizer is not None:
            out["tokenizer_state"] = {k: v.detach().cpu() for k, v in self.tokenizer.state_dict().items()}
            out["tokenizer_optimizer"] = self.tokenizer_optimizer.state_dict()
        return out

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best, self.best_epoch = float(ckpt["best"]), int(ckpt["best_epoch"])
        self.bad_evals, self.history = int(ckpt["bad_evals"]), list(ckpt["history"])
        self.epoch_step, self.epoch_loss = int(ckpt.get("epoch_step", 0)), float(ckpt.get("epoch_loss", 0.0))
        self.epoch_seconds = float(ckpt.get("epoch_seconds", 0.0))
        if self.tokenizer is not None and self.tokenizer_optimizer is not None:
            self.tokenizer.load_state_dict(ckpt["tokenizer_state"])
            self.tokenizer_optimizer.load_state_dict(ckpt["tokenizer_optimizer"])
        set_rng_state(ckpt["rng"])


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to 1, then cosine or linear decay to 0 over the remaining steps, or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress


def new_state(model: Recommender, cfg: TrainBilevelConfig, steps_per_epoch: int,
              tokenizer: nn.Module | None = None) -> TrainState:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train, total))
    if cfg.mode == "fixed" or tokenizer is None:
        return TrainState(model, optimizer, scheduler)
    tok_optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=cfg.bilevel.tokenizer_lr,
                                      weight_decay=cfg.bilevel.tokenizer_weight_decay)
    return TrainState(model, optimizer, scheduler, tokenizer=tokenizer.train(), tokenizer_optimizer=tok_optimizer)


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The sample order of an epoch: a function of (seed, epoch) only, so resume replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it (auto), fp32 elsewhere; a refused bf16 request is logged."""
    if precision == "fp32":
        return None
    capable = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not capable and device.type != "cpu":
        log.warning("bf16 is not supported on %s: training in fp32", device)
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if capable else None


StepFn = Callable[[TrainState, Batch, Part], Tensor]  # -> this process's mean loss on its slice
StopFn = Callable[[], bool]  # True once the user asked the run to stop (SIGINT)


class Stopped(Exception):
    """Raised by `fit` after it saved the state at a safe point because `stop()` said so."""


def fixed_step(cfg: TrainBilevelConfig, amp: torch.dtype | None, device: torch.device) -> StepFn:
    """Mode fixed: one AdamW step of the recommender on next-token cross-entropy; tokenizer frozen."""

    def step(state: TrainState, batch: Batch, part: Part = Part()) -> Tensor:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = state.forward(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.labels).loss
        state.optimizer.zero_grad(set_to_none=True)
        (loss * (part.share * state.dist.world)).backward()  # DDP averages: sum_r share_r * grad_r
        if cfg.train.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.clip_norm)
        state.optimizer.step()
        state.scheduler.step()
        return loss.detach()

    return step


def refresh_codes(state: TrainState, data: TrainData) -> dict[str, float]:
    """Every item's codes from the current tokenizer, written into data.codes (same layout: the
    disambiguation level stays when there is one); returns the codebook statistics of the update."""
    assert state.tokenizer is not None and data.embeddings is not None
    disambiguated = data.codes.shape[1] > state.tokenizer.quantizer.levels
    ids = semantic_ids(state.tokenizer, data.embeddings, data.item_ids, data.vocab.codebook_size,
                       data.embeddings.device, disambiguated)
    state.tokenizer.train()
    new = ids.codes.to(data.codes.device)
    changed = float((new != data.codes).any(dim=1).float().mean())
    data.codes.copy_(new)
    first = ids.stats[0]
    return {"collision_rate": ids.report.collision_rate, "level1_density": first["density"],
            "level1_entropy": first["entropy_bits"], "ids_changed": changed}


def joint_step(cfg: TrainBilevelConfig, data: TrainData, amp: torch.dtype | None, device: torch.device) -> StepFn:
    """Mode joint: recommender and tokenizer updated together on L_rec + lam * L_tok, no look-ahead."""

    def step(state: TrainState, batch: Batch, part: Part = Part()) -> Tensor:
        assert state.tokenizer is not None and state.tokenizer_optimizer is not None
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, rec, _ = joint_loss(state.forward, state.tokenizer, data.embeddings, batch, cfg.bilevel.lam,
                                      part.items)
        state.optimizer.zero_grad(set_to_none=True)
        state.tokenizer_optimizer.zero_grad(set_to_none=True)
        (loss * (part.share * state.dist.world)).backward()
        if state.dist.enabled:  # DDP averaged the recommender's gradients; the tokenizer's by hand
            grads = [p.grad for p in state.tokenizer.parameters() if p.grad is not None]
            state.dist.sum_(grads)
            torch._foreach_div_(grads, state.dist.world)
        if cfg.train.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.clip_norm)
        state.optimizer.step()
        state.tokenizer_optimizer.step()
        state.scheduler.step()
        refresh_codes(state, data)
        return rec.detach()

    return step


def update_steps(cfg: TrainBilevelConfig, steps_per_epoch: int) -> Callable[[int], bool]:
    """Whether the meta step follows global step `step` (0-based): every `tokenizer_every` steps, or
    `updates_per_epoch` times spread evenly over each epoch, the last at its end."""
    if cfg.bilevel.tokenizer_every is not None:
        every = cfg.bilevel.tokenizer_every
        return lambda step: (step + 1) % every == 0
    u = min(cfg.bilevel.updates_per_epoch, steps_per_epoch)
    due = {(j + 1) * steps_per_epoch // u - 1 for j in range(u)}
    return lambda step: step % steps_per_epoch in due


def bilevel_step(cfg: TrainBilevelConfig, data: TrainData, amp: torch.dtype | None, device: torch.device,
                 steps_per_epoch: int) -> StepFn:
    """Mode bilevel: the fixed step, then, when due, the meta step on the same (or a fresh) batch, the
    tokenizer's AdamW step and the refresh of every item's codes; one history row per update."""
    ordinary = fixed_step(cfg, amp, device)
    due = update_steps(cfg, steps_per_epoch)
    eta = cfg.bilevel.lookahead_lr or cfg.train.lr

    def step(state: TrainState, batch: Batch, part: Part = Part()) -> Tensor:
        loss = ordinary(state, batch, part)
        if not due(state.step):
            return loss
        assert state.tokenizer is not None and state.tokenizer_optimizer is not None
        started = time.perf_counter()
        meta_batch = None
        if cfg.bilevel.meta_batch == "next":  # a fresh global batch of batch_size samples, sliced like any
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + state.step)
            pick = torch.randint(len(data.train), (cfg.batch_size,), generator=g).to(data.train.target.device)
            meta_batch = make_batch(data.train.select(state.dist.shard(pick)[0]), data.codes, data.vocab)
        reduce = state.dist.sum_ if state.dist.enabled else None
        meta = meta_gradients(state.model, state.tokenizer, data.embeddings, batch, eta=eta, lam=cfg.bilevel.lam,
                              surgery_method=cfg.bilevel.surgery, meta_batch=meta_batch, chunk=cfg.bilevel.meta_chunk,
                              share=part.share, reduce=reduce, tok_items=part.items)
        state.tokenizer_optimizer.zero_grad(set_to_none=True)
        for name, p in state.tokenizer.named_parameters():
            p.grad = meta.grads[name]
        state.tokenizer_optimizer.step()
        state.model.zero_grad(set_to_none=True)  # the meta step leaves no recommender gradient behind
        row: dict[str, Any] = {"event": "tokenizer_update", "epoch": state.epoch + 1, "step": state.step + 1,
                               "lr": cfg.bilevel.tokenizer_lr, "inner_loss": meta.inner_loss,
                               "outer_loss": meta.outer_loss, "tok_loss": meta.tok_loss,
                               "conflict_fraction": meta.conflict_fraction, **refresh_codes(state, data)}
        row.update({f"cos/{name}": value for name, value in meta.cosine.items()})
        row.update({f"surgery/{name}": float(value) for name, value in meta.fired.items()})
        row["seconds"] = time.perf_counter() - started
        state.history.append(row)
        log.debug("tokenizer update at step %d: outer loss %.4f, conflicts %.2f, collisions %.4f", state.step + 1,
                  meta.outer_loss, meta.conflict_fraction, row["collision_rate"])
        return loss

    return step


def make_step(cfg: TrainBilevelConfig, data: TrainData, device: torch.device, steps_per_epoch: int) -> StepFn:
    """The step function of cfg.mode."""
    amp = autocast_dtype(cfg.train.precision, device)
    if cfg.mode == "joint":
        return joint_step(cfg, data, amp, device)
    if cfg.mode == "bilevel":
        return bilevel_step(cfg, data, amp, device, steps_per_epoch)
    return fixed_step(cfg, amp, device)


def train_epoch(state: TrainState, data: TrainData, cfg: TrainBilevelConfig, step_fn: StepFn,
                device: torch.device, epoch: int, stop: StopFn = lambda: False) -> dict[str, float] | None:
    """One pass over the training samples (from step `state.epoch_step` of it, when a stopped run
    resumes); returns the epoch's mean loss, seconds and samples/s, or None when `stop()` cut it short
    (state.epoch_step and friends then say where it stopped)."""
    state.model.train()
    order = epoch_order(cfg.seed, epoch, len(data.train)).to(device)
    total = torch.full((), state.epoch_loss, device=device)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    first = state.epoch_step
    started = time.perf_counter() - state.epoch_seconds
    dist = state.dist
    with Bar(steps, f"epoch {epoch}/{cfg.epochs}") as bar:
        bar.advance(first)
        for i in range(first, steps):
            start = i * cfg.batch_size
            index = order[start:start + cfg.batch_size]  # the global batch; this process takes its slice
            local, share = dist.shard(index)
            part = Part(share, distinct_items(data.train.history[index], data.train.target[index])
                        if dist.enabled and cfg.mode != "fixed" else None)
            loss = step_fn(state, make_batch(data.train.select(local), data.codes, data.vocab), part)
            total += loss * share
            state.step += 1
            if i % 20 == 0 or i == steps - 1:  # a host sync only every 20 steps
                bar.advance(min(20, steps - bar.done) if i else 1, status=f"loss {float(loss):.4f}")
            if i < steps - 1 and stop():
                state.epoch_step, state.epoch_loss = i + 1, float(total)
                state.epoch_seconds = time.perf_counter() - started
                return None
    state.epoch_step, state.epoch_loss, state.epoch_seconds = 0, 0.0, 0.0
    dist.sum_([total])
    seconds = time.perf_counter() - started
    return {"train_loss": float(total) / steps, "seconds": seconds, "samples_per_s": len(data.train) / seconds}


def validate(state: TrainState, data: TrainData, index: PrefixIndex, cfg: TrainBilevelConfig,
             device: torch.device) -> dict[str, float]:
    """Recall@10 and NDCG@10 by constrained beam search on the validation sample (item-level); under
    torchrun each process decodes a slice of the users and every process gets the whole sample's metrics."""
    dist = state.dist
    users = torch.tensor_split(torch.arange(len(data.valid)), dist.world)[dist.rank]
    ranks = decode_ranks(state.model, data.valid.select(users), data.codes, data.vocab, index, k=VAL_K,
                         beam=cfg.train.val_beam, method="beam", batch_size=cfg.train.eval_batch_size,
                         device=device, description="validating")
    return summarize(dist.gather(ranks), [VAL_K])


def fit(state: TrainState, data: TrainData, cfg: TrainBilevelConfig, step_fn: StepFn, device: torch.device,
        save: Callable[[TrainState, bool], None], stop: StopFn = lambda: False) -> TrainState:
    """Epochs from state.epoch + 1 to cfg.epochs (or early stop); `save(state, improved)` after each.
    When `stop()` turns true: save the state after the current step (or epoch) and raise Stopped."""
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        row: dict[str, Any] = {"event": "epoch", "epoch": epoch, "lr": state.scheduler.get_last_lr()[0]}
        done = train_epoch(state, data, cfg, step_fn, device, epoch, stop)
        if done is None:
            save(state, False)
            raise Stopped
        row.update(done)
        row["step"] = state.step
        improved = False
        row["val_recall_10"] = row["val_ndcg_10"] = None
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.epochs:
            index = PrefixIndex.build(data.codes.cpu(), data.item_ids.cpu(), data.vocab.codebook_size).to(device)
            metrics = validate(state, data, index, cfg, device)  # the constraints of the current codes
            row["val_recall_10"], row["val_ndcg_10"] = metrics["recall@10"], metrics["ndcg@10"]
            value = metrics[cfg.train.metric]
            improved = value > state.best
            if improved:
                state.best, state.best_epoch, state.bad_evals = value, epoch, 0
            else:
                state.bad_evals += 1
        state.epoch = epoch
        state.history.append(row)
        log.info("epoch %d: loss %.4f, val recall@10 %s ndcg@10 %s, %.1f s, %.0f samples/s", epoch,
                 row["train_loss"], _fmt(row["val_recall_10"]), _fmt(row["val_ndcg_10"]), row["seconds"],
                 row["samples_per_s"])
        save(state, improved)
        if stop() and epoch < cfg.epochs:
            raise Stopped
        if cfg.train.patience is not None and state.bad_evals >= cfg.train.patience:
            log.info("early stop after epoch %d: no better %s for %d validations (best %.4f at epoch %d)",
                     epoch, cfg.train.metric, state.bad_evals, state.best, state.best_epoch)
            break
    return state


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
