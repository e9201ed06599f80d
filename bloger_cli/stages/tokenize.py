"""`bloger tokenize`: embeddings -> tokenizer.pt, semantic_ids.parquet and codebook_stats.parquet.

Trains the RQ-VAE (or fits residual k-means, tokenizer/trainer.py), assigns every item its codes in
chunks, appends the disambiguation code (tokenizer/semantic_ids.py), and records per-level statistics.
tokenizer/io.py gives later stages the model back.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from bloger_cli.artifacts import SPECS, save_torch, write_arrow
from bloger_cli.config import TokenizeConfig
from bloger_cli.progress import Steps
from bloger_cli.runtime import resolve_device
from bloger_cli.tokenizer.io import read_embeddings, warm_tokenizer_path
from bloger_cli.tokenizer.semantic_ids import semantic_ids
from bloger_cli.tokenizer.trainer import fit_tokenizer
from bloger_cli.workspace import StageContext, StageResult, Workspace, raw_fingerprint, run_stage

log = logging.getLogger(__name__)


def run(cfg: TokenizeConfig, ws: Workspace, *, force: bool = False, lock_timeout: float = 60.0) -> StageResult:
    """Run the tokenize stage on a workspace (a no-op when the embeddings and config are unchanged)."""
    info = ws.inputs("embeddings")["embeddings"]
    inputs = {"artifact:embeddings": info.content_hash}
    warm = None if cfg.warm_start is None else warm_tokenizer_path(cfg.warm_start)
    if warm is not None:
        inputs[f"file:{warm.resolve()}"] = raw_fingerprint(warm)
    return run_stage(ws, "tokenize", cfg, inputs, lambda ctx: _tokenize(ctx, cfg, info.path, warm),
                     force=force, lock_timeout=lock_timeout)


def _tokenize(ctx: StageContext, cfg: TokenizeConfig, path: Path, warm: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    with Steps("tokenize") as steps:
        steps.step("reading embeddings")
        item_ids, x = read_embeddings(path)
        device = resolve_device(cfg.device)
        steps.step(f"fitting {cfg.method} on {len(x):,} items" + (f", from {warm}" if warm else ""))
        model, epochs_run = fit_tokenizer(cfg, x, device, warm)
        steps.step("assigning codes")
        ids = semantic_ids(model, x, item_ids, cfg.codebook_size, device, cfg.disambiguate)
        codes, report, stats, assignment = ids
        if not cfg.disambiguate and report.colliding_items:
            log.warning("%d items share their semantic ID with another item and disambiguate is off: IDs are "
                        "not one-to-one", report.colliding_items)
        steps.step("writing artifacts")
        _write_outputs(ctx, cfg, model, item_ids, codes, stats)
    return {
        "method": cfg.method, "items": len(item_ids), "levels": cfg.levels, "codebook_size": cfg.codebook_size,
        "id_length": codes.shape[1], "collision_rate": report.collision_rate,
        "colliding_items": report.colliding_items, "largest_collision_group": report.largest_group,
        "reconstruction_error": assignment.reconstruction_error, "epochs_run": epochs_run,
        "device": str(device), "seconds": round(time.perf_counter() - started, 3), "level_stats": stats,
    }


def _write_outputs(ctx: StageContext, cfg: TokenizeConfig, model: nn.Module, item_ids: torch.Tensor,
                   codes: torch.Tensor, stats: list[dict[str, Any]]) -> None:
    order = torch.argsort(item_ids)
    flat = pa.array(codes[order].flatten().numpy().astype(np.int16))
    ids_table = pa.table({"item_id": pa.array(item_ids[order].numpy().astype(np.int32)),
                          "codes": pa.FixedSizeListArray.from_arrays(flat, codes.shape[1])})
    meta = {"method": cfg.method, "levels": cfg.levels, "codebook_size": cfg.codebook_size,
            "disambiguated": cfg.disambiguate}
    write_arrow(ids_table, ctx.output("semantic_ids"), ctx.metadata("semantic_ids", meta))
    stats_table = pa.Table.from_pylist(stats, schema=SPECS["codebook_stats"].schema)
    write_arrow(stats_table, ctx.output("codebook_stats"), ctx.metadata("codebook_stats", meta))
    ckpt = {"method": cfg.method, "config": model.config.to_dict(), "rows": len(item_ids),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_torch(ckpt, ctx.output("tokenizer"), ctx.metadata("tokenizer", meta))


