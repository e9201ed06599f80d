"""The one training loop (docs/design.md §4), parameterised by mode (the step functions of
`training/steps.py`) and driven by the run's `Plan` (`training/schedule.py`).

Every mode runs the same epochs: the training samples in length-grouped shuffled batches (a function
of seed and epoch, so a resumed run sees the same batches), each batch trimmed to its longest history
and built from the current semantic IDs with tensor ops, one step per batch. Validation by constrained
decoding follows the plan (every `eval_every` epochs or `eval_every_steps` steps, and at the end, but
never fewer than `settle_steps` after a re-coding); the best weights by the validation metric are kept,
early stopping counts validations without improvement, and `last.pt` (and `best.pt` when it improved)
is written atomically after every validation and epoch. The run ends after `epochs`, `max_steps` or
`time_budget`, whichever comes first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from bloger_cli.config import TrainBilevelConfig
from bloger_cli.metrics import summarize
from bloger_cli.progress import Bar
from bloger_cli.recommender.batch import make_batch
from bloger_cli.recommender.decoding import PrefixIndex
from bloger_cli.recommender.ranking import decode_ranks
from bloger_cli.training.bilevel import distinct_items
from bloger_cli.training.distributed import Part
from bloger_cli.training.sampler import epoch_batches
from bloger_cli.training.state import TrainData, TrainState
from bloger_cli.training.steps import StepFn

log = logging.getLogger(__name__)

VAL_K = 10  # validation metrics are @10 (docs/design.md §4.4)

StopFn = Callable[[], bool]  # True once the user asked the run to stop (SIGINT)
SaveFn = Callable[[TrainState, bool], None]  # save(state, improved)


class Stopped(Exception):
    """Raised by `fit` after it saved the state at a safe point because `stop()` said so."""


def fit(state: TrainState, data: TrainData, cfg: TrainBilevelConfig, step_fn: StepFn, device: torch.device,
        save: SaveFn, stop: StopFn = lambda: False) -> TrainState:
    """Epochs from where `state` is until the plan's end (epochs, steps, time) or early stopping;
    `save(state, improved)` after each validation and epoch. When `stop()` turns true: save the state
    after the current step and raise Stopped."""
    while state.epoch < cfg.epochs and not state.plan.finished(state.step, state.clock.elapsed()):
        if not train_epoch(state, data, cfg, step_fn, device, state.epoch + 1, save, stop):
            break
    return state


def train_epoch(state: TrainState, data: TrainData, cfg: TrainBilevelConfig, step_fn: StepFn,
                device: torch.device, epoch: int, save: SaveFn, stop: StopFn) -> bool:
    """One pass over the training samples (from step `state.epoch_step` of it, when a stopped run
    resumes), validating where the plan says; False when the run ends in it (budget or early stop)."""
    state.model.train()
    assert data.train_lengths is not None
    lengths, plan, dist = data.train_lengths, state.plan, state.dist
    batches = epoch_batches(cfg.seed, epoch, lengths, cfg.batch_size, cfg.train.bucket_group)
    steps = len(batches)
    total = torch.full((), state.epoch_loss, device=device)
    started = time.perf_counter() - state.epoch_seconds
    row: dict[str, Any] = {"event": "epoch", "epoch": epoch, "lr": state.scheduler.get_last_lr()[0]}
    going, end_improved = True, False
    with Bar(steps, f"epoch {epoch}/{cfg.epochs}") as bar:
        bar.advance(state.epoch_step)
        for i in range(state.epoch_step, steps):
            width = max(1, int(lengths[batches[i]].max()))  # the batch's longest history, from the CPU copy
            index = batches[i].to(device)  # the global batch; this process takes its slice
            local, share = dist.shard(index)
            part = Part(share, distinct_items(data.train.history[index], data.train.target[index])
                        if dist.enabled and cfg.mode != "fixed" else None)
            loss = step_fn(state, make_batch(data.train.select(local).trim(width), data.codes, data.vocab), part)
            total += loss * share
            state.step, state.epoch_step = state.step + 1, i + 1
            if i % 20 == 0 or i == steps - 1:  # a host sync only every 20 steps
                bar.advance(min(20, steps - bar.done) if i else 1, status=_status(loss, state))
            ended = plan.finished(state.step, state.clock.elapsed()) or (i == steps - 1 and epoch == cfg.epochs)
            if cfg.train.time_budget is not None:  # each rank's clock: one decision for all (torchrun)
                ended = dist.any_(ended, device)
            if (plan.validates_after(state.step - 1, epoch) or ended) and _settled(state):
                at_end = i == steps - 1 or ended
                target = row if at_end else {"event": "eval", "epoch": epoch, "lr": state.scheduler.get_last_lr()[0]}
                improved = _validate_into(target, state, data, cfg, device)
                going = not _patience_spent(state, cfg)
                if at_end:
                    end_improved = improved
                else:
                    state.record(target)
                    _save_mid_epoch(state, total, started, save, improved)
            if ended or not going:
                break
            if i < steps - 1 and stop():
                _save_mid_epoch(state, total, started, save, False)
                raise Stopped
    dist.sum_([total])
    seconds = time.perf_counter() - started
    taken = state.epoch_step - state.bad.epoch  # a skipped (non-finite) step adds no loss
    row.update({"train_loss": float(total) / max(1, taken) if taken else None, "seconds": seconds,
                "skipped_steps": state.bad.skipped,
                "samples_per_s": int(lengths.numel() * state.epoch_step / steps) / max(seconds, 1e-9),
                "step": state.step, "elapsed": state.clock.elapsed()})
    row.setdefault("val_recall_10", None)
    row.setdefault("val_ndcg_10", None)
    state.epoch, state.epoch_step, state.epoch_loss, state.epoch_seconds = epoch, 0, 0.0, 0.0
    state.bad.epoch = 0
    state.record(row)
    log.info("epoch %d: loss %s, val recall@10 %s ndcg@10 %s, %.1f s, %.0f samples/s", epoch,
             _fmt(row["train_loss"]), _fmt(row["val_recall_10"]), _fmt(row["val_ndcg_10"]), row["seconds"],
             row["samples_per_s"])
    save(state, end_improved)
    going = going and not dist.any_(plan.finished(state.step, state.clock.elapsed()), device)
    if stop() and going and epoch < cfg.epochs:
        raise Stopped
    return going


def _save_mid_epoch(state: TrainState, total: torch.Tensor, started: float, save: SaveFn, improved: bool) -> None:
    """Save in the middle of an epoch: the epoch's loss and seconds so far go with it (one host sync)."""
    state.epoch_loss, state.epoch_seconds = float(total), time.perf_counter() - started
    save(state, improved)


def _status(loss: torch.Tensor, state: TrainState) -> str:
    budget = state.plan.cfg.train.time_budget
    left = f", {max(0.0, budget - state.clock.elapsed()) / 60:.1f} min left" if budget else ""
    return f"loss {float(loss):.4f}{left}"


def _settled(state: TrainState) -> bool:
    """Whether the recommender has trained `settle` steps on the current codes (or no validation has
    happened yet: a run always gets one)."""
    if state.last_update < 0 or state.best == -math.inf:
        return True
    return state.step - 1 - state.last_update >= state.plan.settle


def _validate_into(row: dict[str, Any], state: TrainState, data: TrainData, cfg: TrainBilevelConfig,
                   device: torch.device) -> bool:
    """Validate now, put the metrics into `row`, update best and patience; returns whether it improved."""
    index = PrefixIndex.build(data.codes.cpu(), data.item_ids.cpu(), data.vocab.codebook_size).to(device)
    metrics = validate(state, data, index, cfg, device)  # the constraints of the current codes
    state.model.train()
    row.update({"step": state.step, "elapsed": state.clock.elapsed(), "val_recall_10": metrics["recall@10"],
                "val_ndcg_10": metrics["ndcg@10"], "steps_since_update":
                state.step - 1 - state.last_update if state.last_update >= 0 else None})
    value = metrics[cfg.train.metric]
    improved = value > state.best
    if improved:
        state.best, state.best_epoch, state.best_step, state.bad_evals = value, row["epoch"], state.step, 0
    else:
        state.bad_evals += 1
    if row["event"] == "eval":
        log.info("step %d: val recall@10 %.4f ndcg@10 %.4f", state.step, metrics["recall@10"], metrics["ndcg@10"])
    return improved


def _patience_spent(state: TrainState, cfg: TrainBilevelConfig) -> bool:
    if cfg.train.patience is not None and state.bad_evals >= cfg.train.patience:
        log.info("early stop at step %d: no better %s for %d validations (best %.4f at step %d)", state.step,
                 cfg.train.metric, state.bad_evals, state.best, state.best_step)
        return True
    return False


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


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
