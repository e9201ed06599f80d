"""What a finished training run reports (the stage's result, `bloger runs --json`): where it stopped,
its best validation, its speed, and in modes joint and bilevel what the tokenizer's updates did."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from bloger_cli.config import TrainBilevelConfig
from bloger_cli.training.state import TrainData, TrainState


def run_result(state: TrainState, data: TrainData, cfg: TrainBilevelConfig, device: torch.device) -> dict[str, Any]:
    """The result of a run from its state and history rows."""
    epochs = [r for r in state.history if r.get("event", "epoch") == "epoch"]
    validated = [r for r in state.history if r.get("event") in ("epoch", "eval") and r.get("val_ndcg_10") is not None]
    best_row = next((r for r in validated if r["step"] == state.best_step), {})
    return {
        "mode": cfg.mode, "epochs_run": state.epoch, "best_epoch": state.best_epoch, "best_step": state.best_step,
        "steps": state.step, "skipped_steps": state.bad.skipped, "elapsed": round(state.clock.elapsed(), 3),
        "metric": cfg.train.metric, "best_value": state.best, "val_recall@10": best_row.get("val_recall_10"),
        "val_ndcg@10": best_row.get("val_ndcg_10"), "train_samples": len(data.train),
        "val_users": len(data.valid), "parameters": sum(p.numel() for p in state.model.parameters()),
        "device": str(device), "device_name": device_name(device),
        # medians: the first epoch of a compiled run (and of each resumed part) also pays for the compile
        "seconds_per_epoch": round(float(np.median([r["seconds"] for r in epochs])), 3),
        "samples_per_s": round(float(np.median([r["samples_per_s"] for r in epochs])), 1),
        **tokenizer_result(state, cfg),
    }


def tokenizer_result(state: TrainState, cfg: TrainBilevelConfig) -> dict[str, Any]:
    """Modes joint and bilevel: the number of tokenizer updates, the last update's codebook statistics,
    and the mean churn (share of items re-coded per update)."""
    if cfg.mode == "fixed":
        return {}
    updates = [r for r in state.history if r.get("event") == "tokenizer_update"]
    out: dict[str, Any] = {"tokenizer_updates": len(updates) if cfg.mode == "bilevel" else state.step}
    if not updates:
        return out
    out.update({k: updates[-1][k] for k in ("collision_rate", "level1_density", "level1_entropy",
                                            "conflict_fraction") if k in updates[-1]})
    recoded = [r for r in updates if "churn" in r]
    out["mean_churn"] = float(np.mean([r["churn"] for r in recoded])) if recoded else None
    out["mean_churn_weighted"] = float(np.mean([r.get("churn_weighted", r["churn"]) for r in recoded])) \
        if recoded else None
    out["updates_skipped"] = len(updates) - len(recoded)
    return out


def device_name(device: torch.device) -> str:
    """The device as a results table names it: the GPU's name, or the CPU and its cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)" if device.type == "cpu" else device.type
