"""Training the RQ-VAE tokenizer: k-means initialisation, AdamW epochs, dead-code re-seeding, early stopping;
and `fit_tokenizer`, which builds (or warm-starts) either method from a TokenizeConfig and fits it.

Deterministic for a seed on a device: batches come from a seeded torch.Generator, k-means and re-seeding
sample from the same generator, and nothing depends on wall-clock or thread timing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bloger_cli.config import TokenizeConfig
from bloger_cli.errors import ConfigError
from bloger_cli.nonfinite import BadSteps, finite, fix_hint, grad_norm
from bloger_cli.progress import track
from bloger_cli.runtime import seed_everything
from bloger_cli.tokenizer.io import load_tokenizer
from bloger_cli.tokenizer.kmeans import RQKMeans, RQKMeansConfig, chunk_rows, residual_kmeans, sample_rows
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.tokenizer.semantic_ids import collision_report, prefix_groups

log = logging.getLogger(__name__)

MIN_IMPROVEMENT = 1e-4  # relative drop of the epoch loss that counts as progress for `patience`


@torch.no_grad()
def init_codebooks(model: RQVAE, x: Tensor, iters: int, generator: torch.Generator, device: torch.device,
                   chunk: int | None = None) -> None:
    """Residual k-means on the encoded items (a sample of at most K x 256), level by level."""
    was_training = model.training
    model.eval()
    chunk = chunk or chunk_rows(device)
    rows = sample_rows(x.shape[0], model.config.codebook_size, generator)
    z = torch.cat([model.encode(x[rows[s:s + chunk]].to(device)) for s in range(0, len(rows), chunk)])  # (N', d)
    books = residual_kmeans(z, model.config.levels, model.config.codebook_size, iters, generator, chunk)
    for param, book in zip(model.quantizer.codebooks, books):
        param.copy_(book)
    model.train(was_training)


@torch.no_grad()
def reseed_dead_codes(model: RQVAE, usage: Tensor, pool: Tensor, generator: torch.Generator,
                      optimizer: torch.optim.Optimizer | None = None) -> list[int]:
    """Move every code unused in the epoch onto a random recent residual of its level.

    usage (L, K): how often each code was chosen; pool (M, L, d): residuals r_l of the last batches.
    The codes' AdamW moments are zeroed so stale momentum does not drag them away. Returns the number
    of codes re-seeded per level.
    """
    reseeded = []
    for level, book in enumerate(model.quantizer.codebooks):
        dead = (usage[level] == 0).nonzero().squeeze(1).to(book.device)
        reseeded.append(len(dead))
        if not len(dead):
            continue
        m = pool.shape[0]
        pick = (torch.randperm(m, generator=generator)[:len(dead)] if m >= len(dead)
                else torch.randint(m, (len(dead),), generator=generator))
        book[dead] = pool[pick.to(pool.device), level].to(book.dtype)
        state = optimizer.state.get(book, {}) if optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0.0
    return reseeded


class EpochStats(NamedTuple):
    loss: float  # mean total loss over the epoch's items
    recon: float  # mean reconstruction loss
    collision_rate: float  # share of items sharing all L codes, from the codes assigned during the epoch
    usage: Tensor  # (L, K) times each code was chosen
    pool: Tensor  # (M, L, d) residuals of the last batches, M >= K when the catalog allows


def run_epoch(model: RQVAE, x: Tensor, optimizer: torch.optim.Optimizer, batch_size: int,
              generator: torch.Generator, bad: BadSteps | None = None, hint: str = "", epoch: int = 1) -> EpochStats:
    """One pass over the items in a seeded random order. A batch whose loss or gradient is not finite
    takes no step and is counted in `bad` (nonfinite.py); the epoch's means are over the other batches."""
    model.train()
    bad = bad or BadSteps(1 << 62)
    n, levels, k = x.shape[0], model.config.levels, model.config.codebook_size
    device = x.device
    perm = torch.randperm(n, generator=generator).to(device)
    usage = torch.zeros(levels * k, dtype=torch.int64, device=device)
    epoch_codes = torch.empty(n, levels, dtype=torch.int64, device=device)
    offsets = torch.arange(levels, device=device) * k  # (L,) flattens (level, code) for one bincount
    total = torch.zeros((), dtype=torch.float64, device=device)
    recon = torch.zeros((), dtype=torch.float64, device=device)
    recent: list[Tensor] = []
    taken = 0
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        out = model(x[idx], with_probs=False)
        optimizer.zero_grad(set_to_none=True)
        out.losses.total.backward()
        if bool(finite(out.losses.total, grad_norm(model.parameters()))):
            bad.good()
            optimizer.step()
            taken += len(idx)
            total += out.losses.total.detach().double() * len(idx)
            recon += out.losses.recon.detach().double() * len(idx)
        else:
            optimizer.zero_grad(set_to_none=True)
            bad.bad(f"tokenize: RQ-VAE step {start // batch_size + 1} of epoch {epoch}", hint)
        usage += torch.bincount((out.codes + offsets).flatten(), minlength=levels * k)
        epoch_codes[idx] = out.codes
        recent.append(out.residuals.detach())  # (B, L, d)
        while len(recent) > 1 and sum(len(r) for r in recent[1:]) >= k:
            recent.pop(0)
    collisions = collision_report(prefix_groups(epoch_codes.cpu())[-1]).collision_rate
    mean = (lambda value: float(value) / taken) if taken else (lambda value: math.inf)
    return EpochStats(mean(total), mean(recon), collisions, usage.view(levels, k), torch.cat(recent))


class TrainResult(NamedTuple):
    epochs_run: int
    best_epoch: int  # the epoch whose weights were kept (0: k-means initialisation only)
    best_loss: float
    history: list[dict[str, Any]]  # per epoch: epoch, loss, recon, collision_rate, dead_codes


def train_rqvae(model: RQVAE, x: Tensor, cfg: TokenizeConfig, generator: torch.Generator,
                init: bool = True) -> TrainResult:
    """k-means init (unless `init` is off: a warm start), then up to `cfg.epochs` epochs; keeps the
    weights of the epoch with the lowest loss (the starting weights when no epoch runs).

    Early stopping watches the epoch's total loss (reconstruction + quantisation): it is what the
    optimiser minimises and costs nothing extra. The collision rate is logged but not a stopping
    criterion: it is noisy from epoch to epoch and is fixed afterwards by disambiguation anyway.
    """
    if init:
        init_codebooks(model, x, cfg.kmeans_iters, generator, x.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_loss, best_epoch, stale = float("inf"), 0, 0
    best_state = _snapshot(model)
    history: list[dict[str, Any]] = []
    bad, hint = BadSteps(cfg.max_bad_steps), fix_hint("lr (--set lr=...)", cfg.lr)
    for epoch in track(range(1, cfg.epochs + 1), cfg.epochs, "tokenize: training the RQ-VAE"):
        stats = run_epoch(model, x, optimizer, cfg.batch_size, generator, bad, hint, epoch)
        dead = (stats.usage == 0).sum(dim=1).tolist()
        history.append({"epoch": epoch, "loss": stats.loss, "recon": stats.recon,
                        "collision_rate": stats.collision_rate, "dead_codes": dead, "skipped_steps": bad.skipped})
        log.info("epoch %d/%d: loss %.5f (recon %.5f), collisions %.2f%%, unused codes per level %s",
                 epoch, cfg.epochs, stats.loss, stats.recon, 100 * stats.collision_rate, dead)
        if stats.loss < best_loss * (1 - MIN_IMPROVEMENT) or best_epoch == 0:
            best_loss, best_epoch, stale, best_state = stats.loss, epoch, 0, _snapshot(model)
        else:
            stale += 1
            if cfg.patience is not None and stale >= cfg.patience:
                log.info("no improvement for %d epochs: stopping at epoch %d", stale, epoch)
                break
        if cfg.dead_codes == "reseed" and epoch < cfg.epochs:
            reseed_dead_codes(model, stats.usage, stats.pool, generator, optimizer)
    model.load_state_dict(best_state)
    if bad.skipped:
        log.warning("tokenize: %d RQ-VAE steps skipped for a non-finite loss or gradient", bad.skipped)
    return TrainResult(len(history), best_epoch, best_loss, history)


def _snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def new_tokenizer(cfg: TokenizeConfig, input_dim: int) -> RQVAE | RQKMeans:
    """A freshly initialised tokenizer of the config's method and layout for `input_dim`-wide embeddings."""
    if cfg.method == "rq-kmeans":
        return RQKMeans(RQKMeansConfig(input_dim, cfg.levels, cfg.codebook_size))
    return RQVAE(RQVAEConfig.resolve(input_dim, cfg.code_dim, cfg.levels, cfg.codebook_size, cfg.hidden,
                                     cfg.dropout, cfg.commitment))


def check_warm(model: RQVAE | RQKMeans, cfg: TokenizeConfig, input_dim: int, path: Path) -> None:
    """A warm-start tokenizer must have the layout the config asks for: the same method, levels, codes
    per level and (RQ-VAE) widths, so that its IDs stay compatible."""
    want = new_tokenizer(cfg, input_dim).config.to_dict()
    have = model.config.to_dict()
    method = "rq-kmeans" if isinstance(model, RQKMeans) else "rqvae"
    diff = [f"{key} {have[key]} (config: {want[key]})" for key in ("levels", "codebook_size", "code_dim", "hidden")
            if key in want and key in have and have[key] != want[key]]
    if method != cfg.method:
        diff.insert(0, f"method {method} (config: {cfg.method})")
    if diff:
        raise ConfigError(f"--warm-start {path} does not fit the config: {', '.join(diff)}",
                          hint="use the earlier run's tokenize settings, or start without --warm-start")


def fit_tokenizer(cfg: TokenizeConfig, x: torch.Tensor, device: torch.device,
                  warm: Path | None = None) -> tuple[RQVAE | RQKMeans, int]:
    """A trained RQ-VAE or fitted residual k-means on `device` (from `warm`'s weights when given: an
    RQ-VAE then trains on without k-means init, residual k-means is kept as is); returns (model, epochs run)."""
    generator = seed_everything(cfg.seed)  # seeds the weight init too, so it comes first
    if warm is None:
        model = new_tokenizer(cfg, x.shape[1])
    else:
        model = load_tokenizer(warm, input_dim=x.shape[1]).train()
        check_warm(model, cfg, x.shape[1], warm)
    model = model.to(device)
    x = x.to(device)
    if isinstance(model, RQKMeans):
        if warm is None:
            model.fit(x, cfg.kmeans_iters, generator)
        return model, 0
    result = train_rqvae(model, x, cfg, generator, init=warm is None)
    log.info("kept the weights of epoch %d (loss %.5f) of %d", result.best_epoch, result.best_loss,
             result.epochs_run)
    return model, result.epochs_run
