"""`bloger baseline`: SASRec or popularity on exactly the workspace's leave-one-out split.

The same training samples (`data/samples.load_split`), the same validation and test targets, the same
item-level metrics (`metrics.py`) and cut-offs as `bloger evaluate`, so the numbers sit in one table with
the generative runs. Ranking is over every item by score; a user's history items are NOT removed from
the ranking, because the generative `evaluate` does not remove them either (and RecBole's full-sort
evaluation of sequential models does not).

Writes `baseline.pt` (SASRec's best weights), `baseline_history.parquet` (one row per epoch) and
`baseline_metrics.parquet` (the test metrics of the latest run of each baseline model).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.nn import functional as F

from bloger_cli.artifacts import SPECS, read_table, save_torch, write_arrow
from bloger_cli.baseline.config import BaselineConfig
from bloger_cli.baseline.sasrec import SASRec, num_parameters
from bloger_cli.data.samples import Samples, load_split, max_history, training_items
from bloger_cli.metrics import MetricAccumulator, popularity_ranking, ranks, summarize
from bloger_cli.progress import Bar
from bloger_cli.runtime import resolve_device, seed_everything
from bloger_cli.workspace import StageContext, StageResult, Workspace, run_stage

log = logging.getLogger(__name__)


def run(cfg: BaselineConfig, ws: Workspace, *, force: bool = False, lock_timeout: float = 60.0) -> StageResult:
    """Train (SASRec) or count (popularity) and evaluate on the test users; recorded as a `baseline` run."""
    infos = ws.inputs("sequences", "items")
    inputs = {f"artifact:{kind}": info.content_hash for kind, info in infos.items()}
    sequences, num_items = infos["sequences"].path, infos["items"].rows
    return run_stage(ws, "baseline", cfg, inputs, lambda ctx: _baseline(ctx, cfg, sequences, num_items),
                     force=force, lock_timeout=lock_timeout, same_kind=lambda r: r.config.get("model") == cfg.model)


def _baseline(ctx: StageContext, cfg: BaselineConfig, sequences: Path, num_items: int) -> dict[str, Any]:
    started = time.perf_counter()
    test = load_split(sequences, "test")
    top = max(cfg.k)
    extra: dict[str, Any] = {}
    if cfg.model == "popularity":
        popular = popularity_ranking(training_items(sequences), num_items, top)  # (top,)
        rank = ranks(popular.expand(len(test), top), test.target)
    else:
        device = resolve_device(cfg.device)
        model, extra = train_sasrec(ctx, cfg, sequences, num_items, device)
        rank = score_ranks(model, test, top, cfg.eval_batch_size, device, "scoring test users")
    metrics = summarize(rank, cfg.k)
    _write_metrics(ctx, cfg, len(test), metrics)
    return {"mode": cfg.model, "model": cfg.model, "seed": cfg.seed, "split": "test", "users": len(test),
            "items": num_items, **extra, "seconds": round(time.perf_counter() - started, 3), "metrics": metrics}


@torch.no_grad()
def score_ranks(model: SASRec, samples: Samples, k: int, batch_size: int, device: torch.device,
                description: str) -> torch.Tensor:
    """0-based rank of each target among all items by score (metrics.MISS past k); history not masked."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    k = min(k, model.num_items)
    with Bar(-(-len(samples) // batch_size), description) as bar:
        for start in range(0, len(samples), batch_size):
            history = samples.history[start:start + batch_size].to(device)
            top = model(history).logits.topk(k, dim=1).indices  # (B, k)
            acc.update(top.cpu(), samples.target[start:start + batch_size])
            bar.advance()
    model.train(was_training)
    return acc.rank


def train_sasrec(ctx: StageContext, cfg: BaselineConfig, sequences: Path, num_items: int,
                 device: torch.device) -> tuple[SASRec, dict[str, Any]]:
    """Full-softmax cross-entropy training; the best epoch by validation NDCG@10, patience in epochs."""
    generator = seed_everything(cfg.seed)
    train, valid = load_split(sequences, "train"), load_split(sequences, "valid")
    model = SASRec(cfg.sasrec, num_items, max_history(sequences)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sasrec.lr, weight_decay=cfg.sasrec.weight_decay)
    log.info("SASRec: %s parameters, %d training samples, %d items, on %s", f"{num_parameters(model):,}",
             len(train), num_items, device)
    history: list[dict[str, Any]] = []
    best, best_epoch, best_state, step = -1.0, 0, None, 0
    clock, stopped_by = time.perf_counter(), "epochs"
    for epoch in range(1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        order = torch.randperm(len(train), generator=generator)
        total, batches = 0.0, 0
        with Bar(-(-len(train) // cfg.batch_size), f"SASRec epoch {epoch}") as bar:
            for start in range(0, len(train), cfg.batch_size):
                part = train.select(order[start:start + cfg.batch_size])
                loss = F.cross_entropy(model(part.history.to(device)).logits, part.target.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches, step = total + loss.item(), batches + 1, step + 1
                bar.advance()
                if cfg.time_budget is not None and time.perf_counter() - clock >= cfg.time_budget:
                    stopped_by = "time_budget"  # this epoch ends here, validated like any other
                    break
        val = summarize(score_ranks(model, valid, 10, cfg.eval_batch_size, device, "validating"), [10])
        seconds = time.perf_counter() - epoch_started
        history.append({"event": "epoch", "epoch": epoch, "step": step, "lr": cfg.sasrec.lr,
                        "train_loss": total / batches, "val_recall_10": val["recall@10"],
                        "val_ndcg_10": val["ndcg@10"], "seconds": seconds,
                        "samples_per_s": min(len(train), batches * cfg.batch_size) / seconds})
        log.info("epoch %d: loss %.4f, valid R@10 %.4f N@10 %.4f, %.1fs", epoch, total / batches,
                 val["recall@10"], val["ndcg@10"], seconds)
        if val["ndcg@10"] > best:
            best, best_epoch, best_state = val["ndcg@10"], epoch, copy.deepcopy(model.state_dict())
        elif cfg.patience is not None and epoch - best_epoch >= cfg.patience:
            log.info("no better validation NDCG@10 for %d epochs: stopping", cfg.patience)
            stopped_by = "patience"
            break
        if stopped_by == "time_budget":
            log.info("time budget of %.0f s spent in epoch %d: stopping", cfg.time_budget, epoch)
            break
    assert best_state is not None  # the first epoch always improves on -1
    model.load_state_dict(best_state)
    save_torch({"state_dict": best_state, "sasrec": cfg.sasrec.model_dump(mode="json"), "num_items": num_items,
                "max_len": model.max_len, "epoch": best_epoch, "rows": num_items},
               ctx.output("baseline_checkpoint"), ctx.metadata("baseline_checkpoint", {"model": "sasrec"}))
    schema = SPECS["baseline_history"].schema
    write_arrow(pa.Table.from_pylist(history, schema=schema), ctx.output("baseline_history"),
                ctx.metadata("baseline_history", {"mode": "sasrec"}))
    best_row = history[best_epoch - 1]
    return model, {
        "epochs_run": len(history), "best_epoch": best_epoch, "stopped_by": stopped_by, "steps": step,
        "train_samples": len(train),
        "val_users": len(valid), "val_recall@10": best_row["val_recall_10"], "val_ndcg@10": best_row["val_ndcg_10"],
        "parameters": num_parameters(model), "device": str(device), "device_name": _device_name(device),
        "seconds_per_epoch": round(float(np.median([r["seconds"] for r in history])), 3),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def _write_metrics(ctx: StageContext, cfg: BaselineConfig, n_users: int, metrics: dict[str, float]) -> None:
    """The latest metrics of every baseline model: this run's rows replace those of the same model."""
    path = ctx.workspace.path("baseline_metrics")
    kept = [] if not path.is_file() else [
        row for row in read_table(path, SPECS["baseline_metrics"]).to_pylist() if row["method"] != cfg.model]
    for name, value in metrics.items():
        metric, k = name.split("@")
        kept.append({"run_id": ctx.run_id, "split": "test", "method": cfg.model, "metric": metric, "k": int(k),
                     "value": float(value), "n_users": n_users})
    table = pa.Table.from_pylist(kept, schema=SPECS["baseline_metrics"].schema)
    write_arrow(table, ctx.output("baseline_metrics"), ctx.metadata("baseline_metrics"))
