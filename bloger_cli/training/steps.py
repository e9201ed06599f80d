"""One training step per mode (docs/design.md §4.1), and the re-coding of items after a tokenizer update.

`fixed` (TIGER) updates the recommender only and the tokenizer stays frozen; `joint` updates both every
step on L_rec + lam * L_tok through the mixed representation; `bilevel` takes the fixed step every step
and, when the run's `Plan` says so, the meta step of `training/bilevel.py`. After every tokenizer update
all items' codes are recomputed in place (`data.codes`), items whose codes did not change keep their
disambiguation code, and a `tokenizer_update` history row records the update and how much it moved:
churn per level, weighted by training occurrences, and among the validation targets.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bloger_cli.config import TrainBilevelConfig
from bloger_cli.nonfinite import finite, fix_hint, grad_norm
from bloger_cli.recommender.batch import Batch, make_batch
from bloger_cli.tokenizer.semantic_ids import SemanticIDs, semantic_ids
from bloger_cli.training.bilevel import MetaResult, joint_loss, meta_gradients
from bloger_cli.training.distributed import Part
from bloger_cli.training.state import TrainData, TrainState

log = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Batch, Part], Tensor]  # -> this process's mean loss on its slice


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


def checked(state: TrainState, ok: Tensor, what: str, hint: str) -> bool:
    """Whether a step may update: `ok` (its loss and gradients are finite) on every rank, so that all
    ranks skip together. A bad step drops its gradients and is counted (`Diverged` at the limit)."""
    if not state.dist.any_(not bool(ok), ok.device):
        state.bad.good()
        return True
    state.optimizer.zero_grad(set_to_none=True)
    if state.tokenizer_optimizer is not None:
        state.tokenizer_optimizer.zero_grad(set_to_none=True)
    state.bad.bad(f"{what} {state.step + 1} (epoch {state.epoch + 1})", hint)
    return False


def _skip_schedule(state: TrainState) -> None:
    """Advance the schedule past a skipped step, so the rate stays a function of the step count (torch
    warns when a schedule steps before its optimiser ever did: expected here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        state.scheduler.step()


def _recommender_norm(state: TrainState, cfg: TrainBilevelConfig) -> Tensor:
    """The recommender's gradient norm, clipped to clip_norm when set (NaN or inf when any gradient is)."""
    if cfg.train.clip_norm is not None:
        return torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.clip_norm)
    return grad_norm(state.model.parameters())


def fixed_step(cfg: TrainBilevelConfig, amp: torch.dtype | None, device: torch.device) -> StepFn:
    """Mode fixed: one AdamW step of the recommender on next-token cross-entropy; tokenizer frozen. A
    step with a non-finite loss or gradient is skipped (nonfinite.py); it returns a zero loss."""
    hint = fix_hint("train.lr", cfg.train.lr, cfg.train.precision)

    def step(state: TrainState, batch: Batch, part: Part = Part()) -> Tensor:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = state.forward(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.labels).loss
        state.optimizer.zero_grad(set_to_none=True)
        (loss * (part.share * state.dist.world)).backward()  # DDP averages: sum_r share_r * grad_r
        if not checked(state, finite(loss, _recommender_norm(state, cfg)), "recommender step", hint):
            _skip_schedule(state)
            return torch.zeros((), device=loss.device)
        state.optimizer.step()
        state.scheduler.step()
        return loss.detach()

    return step


def recode(state: TrainState, data: TrainData) -> SemanticIDs:
    """Every item's IDs from the current tokenizer, in data.codes' layout (with the disambiguation level
    when it has one, kept for items whose codes did not change); data.codes is not touched."""
    assert state.tokenizer is not None and data.embeddings is not None
    disambiguated = data.codes.shape[1] > state.tokenizer.quantizer.levels
    ids = semantic_ids(state.tokenizer, data.embeddings, data.item_ids, data.vocab.codebook_size,
                       data.embeddings.device, disambiguated, previous=data.codes)
    state.tokenizer.train()
    return ids


def churn(old: Tensor, new: Tensor, data: TrainData) -> dict[str, float]:
    """How much an update moved the IDs: the share of items with any code changed (`churn`, also
    `ids_changed`), per level, weighted by training occurrences, and among the validation targets."""
    changed = (new != old)  # (N, L')
    moved = changed.any(dim=1).float()  # (N,)
    row = {"churn": float(moved.mean()), "ids_changed": float(moved.mean())}
    row.update({f"churn_level{level + 1}": float(changed[:, level].float().mean()) for level in range(old.shape[1])})
    if data.item_weights is not None:
        weights = data.item_weights.to(moved.device)
        row["churn_weighted"] = float((weights * moved).sum() / weights.sum().clamp_min(1e-12))
    row["churn_valid_targets"] = float(moved[data.valid.target.to(moved.device)].mean())
    return row


def commit_codes(state: TrainState, data: TrainData, ids: SemanticIDs, remember: bool = False) -> dict[str, float]:
    """Write new IDs into data.codes (`remember`: keep the old ones in state.codes_before, for a
    checkpoint); returns the churn and codebook statistics of the change."""
    new = ids.codes.to(data.codes.device)
    row = churn(data.codes, new, data)
    if remember:
        state.codes_before = data.codes.to(torch.int32).cpu()
    data.codes.copy_(new)
    first = ids.stats[0]
    return {**row, "collision_rate": ids.report.collision_rate, "level1_density": first["density"],
            "level1_entropy": first["entropy_bits"]}


def joint_step(cfg: TrainBilevelConfig, data: TrainData, amp: torch.dtype | None, device: torch.device) -> StepFn:
    """Mode joint: recommender and tokenizer updated together on L_rec + lam * L_tok, no look-ahead; a
    step with a non-finite loss or gradient updates neither, and the codes stay."""
    hint = fix_hint("train.lr", cfg.train.lr, cfg.train.precision)

    def step(state: TrainState, batch: Batch, part: Part = Part()) -> Tensor:
        assert state.tokenizer is not None and state.tokenizer_optimizer is not None
        assert data.embeddings is not None  # loaded with the tokenizer in modes joint and bilevel
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, rec, _ = joint_loss(state.forward, state.tokenizer, data.embeddings, batch, cfg.bilevel.lam,
                                      part.items, cfg.bilevel.routing, cfg.bilevel.tok_loss)
        state.optimizer.zero_grad(set_to_none=True)
        state.tokenizer_optimizer.zero_grad(set_to_none=True)
        (loss * (part.share * state.dist.world)).backward()
        if state.dist.enabled:  # DDP averaged the recommender's gradients; the tokenizer's by hand
            grads = [p.grad for p in state.tokenizer.parameters() if p.grad is not None]
            state.dist.sum_(grads)
            torch._foreach_div_(grads, state.dist.world)
        ok = finite(loss, _recommender_norm(state, cfg), grad_norm(state.tokenizer.parameters()))
        if not checked(state, ok, "joint step", hint):
            _skip_schedule(state)
            return torch.zeros((), device=loss.device)
        state.optimizer.step()
        state.tokenizer_optimizer.step()
        state.scheduler.step()
        commit_codes(state, data, recode(state, data))
        return rec.detach()

    return step


def random_batch(data: TrainData, cfg: TrainBilevelConfig, state: TrainState, salt: int) -> Batch:
    """A fresh global batch of batch_size random training samples (seeded by seed, step and salt), this
    process's slice of it, trimmed to its longest history."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + state.step * 7 + salt)
    pick = torch.randint(len(data.train), (cfg.batch_size,), generator=g)
    assert data.train_lengths is not None
    width = max(1, int(data.train_lengths[pick].max()))
    local = state.dist.shard(pick.to(data.train.target.device))[0]
    return make_batch(data.train.select(local).trim(width), data.codes, data.vocab)


def _sum(tensors: list[Tensor]) -> Tensor:
    """Left to right, as the builtin sum (0 + a is a), typed as a Tensor."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _mean(results: list[MetaResult]) -> MetaResult:
    """The meta-gradients of several batches averaged (the telemetry too)."""
    if len(results) == 1:
        return results[0]
    n = len(results)
    grads = {name: _sum([r.grads[name] for r in results]) / n for name in results[0].grads}
    cosine = {name: sum(r.cosine[name] for r in results) / n for name in results[0].cosine}
    fired = {name: any(r.fired[name] for r in results) for name in results[0].fired}
    return MetaResult(grads, cosine, fired, *(sum(getattr(r, key) for r in results) / n
                                              for key in ("inner_loss", "outer_loss", "tok_loss")))


def bilevel_step(cfg: TrainBilevelConfig, data: TrainData, amp: torch.dtype | None, device: torch.device,
                 due: Callable[[TrainState], bool]) -> StepFn:
    """Mode bilevel: the fixed step, then, when `due(state)`, the meta step (averaged over `meta_batches`
    batches), the tokenizer's AdamW step (scaled back under `max_churn`) and the re-coding of every item."""
    ordinary = fixed_step(cfg, amp, device)
    b = cfg.bilevel
    eta = b.lookahead_lr or cfg.train.lr
    meta_hint = fix_hint("bilevel.tokenizer_lr", b.tokenizer_lr, cfg.train.precision)

    def step(state: TrainState, batch: Batch, part: Part = Part()) -> Tensor:
        loss = ordinary(state, batch, part)
        if not due(state):
            return loss
        assert state.tokenizer is not None and state.tokenizer_optimizer is not None
        assert data.embeddings is not None  # loaded with the tokenizer in modes joint and bilevel
        started = time.perf_counter()
        reduce = state.dist.sum_ if state.dist.enabled else None
        results = []
        for i in range(b.meta_batches):
            inner = batch if i == 0 else random_batch(data, cfg, state, 2 * i)
            outer = random_batch(data, cfg, state, 2 * i + 1) if b.meta_batch == "next" else None
            results.append(meta_gradients(
                state.model, state.tokenizer, data.embeddings, inner, eta=eta, lam=b.lam, surgery_method=b.surgery,
                meta_batch=outer, chunk=b.meta_chunk, share=part.share, reduce=reduce,
                tok_items=part.items if i == 0 else None, routing=b.routing, tok_norm=b.tok_loss))
        meta = _mean(results)
        lr = b.tokenizer_lr * min(1.0, (state.tokenizer_updates + 1) / max(1, b.tokenizer_warmup))
        meta_ok = finite(*meta.grads.values()) & all(map(math.isfinite, (meta.inner_loss, meta.outer_loss,
                                                                          meta.tok_loss)))
        if not checked(state, meta_ok, "meta step after step", meta_hint):
            state.model.zero_grad(set_to_none=True)
            state.record({"event": "tokenizer_update", "epoch": state.epoch + 1, "step": state.step + 1,
                                  "lr": lr, "non_finite": 1.0, "seconds": time.perf_counter() - started})
            return loss
        for group in state.tokenizer_optimizer.param_groups:
            group["lr"] = lr
        state.tokenizer_optimizer.zero_grad(set_to_none=True)
        for name, p in state.tokenizer.named_parameters():
            p.grad = meta.grads[name]
        scale, ids = _guarded_step(state, data, b.max_churn)
        state.model.zero_grad(set_to_none=True)  # the meta step leaves no recommender gradient behind
        row: dict[str, Any] = {"event": "tokenizer_update", "epoch": state.epoch + 1, "step": state.step + 1,
                               "lr": lr, "inner_loss": meta.inner_loss, "outer_loss": meta.outer_loss,
                               "tok_loss": meta.tok_loss, "conflict_fraction": meta.conflict_fraction,
                               "scale": scale, "steps_since_update": state.step - state.last_update,
                               "elapsed": state.clock.elapsed()}
        state.tokenizer_updates += 1
        if ids is not None:
            row.update(commit_codes(state, data, ids, remember=True))
            state.last_update = state.step
        row.update({f"cos/{name}": value for name, value in meta.cosine.items()})
        row.update({f"surgery/{name}": float(value) for name, value in meta.fired.items()})
        row["seconds"] = time.perf_counter() - started
        state.record(row)
        log.debug("tokenizer update at step %d: churn %.3f (scale %.3g), outer loss %.4f, conflicts %.2f",
                  state.step + 1, row.get("churn", 0.0), scale, meta.outer_loss, meta.conflict_fraction)
        return loss

    return step


def _guarded_step(state: TrainState, data: TrainData, max_churn: float | None) -> tuple[float, SemanticIDs | None]:
    """`_limited_step`, undone (weights and AdamW moments as they were, no new IDs) when it would leave a
    tokenizer weight NaN or inf: finite gradients can still overflow a weight."""
    assert state.tokenizer is not None and state.tokenizer_optimizer is not None
    params = list(state.tokenizer.parameters())
    weights = [p.detach().clone() for p in params]
    moments = copy.deepcopy(state.tokenizer_optimizer.state_dict())
    scale, ids = _limited_step(state, data, max_churn)
    if bool(finite(*params)):
        return scale, ids
    log.warning("the tokenizer update at step %d would make a weight non-finite: undone, the IDs stay",
                state.step + 1)
    with torch.no_grad():
        for p, old in zip(params, weights):
            p.copy_(old)
    state.tokenizer_optimizer.load_state_dict(moments)
    return 0.0, None


def _limited_step(state: TrainState, data: TrainData, max_churn: float | None) -> tuple[float, SemanticIDs | None]:
    """The tokenizer's optimiser step, halved (up to 6 times) while it would re-code more than
    `max_churn` of the items, and undone when even 1/64 of it would: (scale taken, new IDs or None)."""
    assert state.tokenizer is not None and state.tokenizer_optimizer is not None
    params = list(state.tokenizer.parameters())
    before = [p.detach().clone() for p in params] if max_churn is not None else []
    state.tokenizer_optimizer.step()
    ids = recode(state, data)
    if max_churn is None:
        return 1.0, ids
    scale = 1.0
    with torch.no_grad():
        for attempt in range(7):
            if float((ids.codes.to(data.codes.device) != data.codes).any(dim=1).float().mean()) <= max_churn:
                return scale, ids
            if attempt == 6:
                break
            scale /= 2
            for p, old in zip(params, before):
                p.copy_(old + (p - old) * 0.5)
            ids = recode(state, data)
        for p, old in zip(params, before):
            p.copy_(old)
    return 0.0, None


def make_step(cfg: TrainBilevelConfig, data: TrainData, device: torch.device,
              due: Callable[[TrainState], bool]) -> StepFn:
    """The step function of cfg.mode; `due(state)` says whether a bilevel tokenizer update follows."""
    amp = autocast_dtype(cfg.train.precision, device)
    if cfg.mode == "joint":
        return joint_step(cfg, data, amp, device)
    if cfg.mode == "bilevel":
        return bilevel_step(cfg, data, amp, device, due)
    return fixed_step(cfg, amp, device)
