"""`bloger evaluate`: decode held-out users with a trained recommender and score the rankings item-level.

The checkpoint carries the semantic IDs its model was trained on, so decoding constraints and the
code -> item mapping always match the model (in the bi-level modes the IDs move during training).
A popularity row (the most frequent training items, the same list for every user) is the reference.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bloger_cli.artifacts import SPECS, file_hash, write_arrow
from bloger_cli.config import EvaluateConfig
from bloger_cli.data.samples import load_split, training_items
from bloger_cli.metrics import popularity_ranking, ranks, summarize
from bloger_cli.recommender.decoding import PrefixIndex
from bloger_cli.recommender.ranking import decode_ranks
from bloger_cli.runtime import resolve_device
from bloger_cli.training.checkpoint import build_recommender, check_trained_on, load_checkpoint
from bloger_cli.workspace import StageContext, StageResult, Workspace, raw_fingerprint, run_stage

log = logging.getLogger(__name__)


def run(cfg: EvaluateConfig, ws: Workspace, *, force: bool = False, lock_timeout: float = 60.0) -> StageResult:
    """Evaluate a checkpoint (default: the run's best.pt; the latest run unless one is named) on the test
    or validation users."""
    ws = ws.latest_run()
    sequences = ws.inputs("sequences")["sequences"]
    path = Path(cfg.checkpoint) if cfg.checkpoint is not None else ws.path("checkpoint")
    ckpt = load_checkpoint(path)
    check_trained_on(ckpt, path, sequences)
    own = path.resolve() == ws.path("checkpoint").resolve()
    inputs = {"artifact:sequences": sequences.content_hash,
              **({"artifact:checkpoint": file_hash(path)} if own else {f"file:{path}": raw_fingerprint(path)})}
    return run_stage(ws, "evaluate", cfg, inputs, lambda ctx: _evaluate(ctx, cfg, ckpt, path, sequences.path),
                     force=force, lock_timeout=lock_timeout)


def _evaluate(ctx: StageContext, cfg: EvaluateConfig, ckpt: dict[str, Any], path: Path,
              sequences: Path) -> dict[str, Any]:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    model = build_recommender(ckpt, path).to(device)
    codes = ckpt["codes"].long()  # (N, L') the IDs the model was trained with
    item_ids = torch.arange(len(codes))
    vocab = model.config.vocab
    index = PrefixIndex.build(codes, item_ids, vocab.codebook_size).to(device)
    samples = load_split(sequences, cfg.split)
    top = max(cfg.k)
    decode_started = time.perf_counter()
    rank = decode_ranks(model, samples, codes, vocab, index, k=top, beam=cfg.beam, method=cfg.decode,
                        batch_size=cfg.batch_size, device=device, description=f"decoding {cfg.split} users")
    decode_seconds = time.perf_counter() - decode_started
    metrics = summarize(rank, cfg.k)
    popular = popularity_ranking(training_items(sequences), len(codes), top)
    popularity = summarize(ranks(popular.expand(len(samples), top), samples.target), cfg.k)
    _write_metrics(ctx, cfg, len(samples), {"model": metrics, "popularity": popularity})
    baseline = best_baseline(ctx.workspace, cfg.split, list(metrics))
    return {
        "split": cfg.split, "users": len(samples), "items": len(codes), "decode": cfg.decode, "beam": cfg.beam,
        "checkpoint": str(path), "epoch": int(ckpt["epoch"]), "device": str(device),
        "mode": ckpt.get("mode"), "seed": ckpt.get("config", {}).get("seed"),
        "users_per_s": round(len(samples) / decode_seconds, 1), "seconds": round(time.perf_counter() - started, 3),
        "metrics": metrics, "popularity": popularity, **({"baseline": baseline} if baseline else {}),
    }


def best_baseline(ws: Workspace, split: str, names: list[str]) -> dict[str, Any] | None:
    """The best `bloger baseline` run of this workspace on the current sequences (by NDCG@10, else the
    first shared metric), for the table beside the model; None when there is none to compare with."""
    if split != "test":
        return None  # baselines are tested on the test users only
    current = ws.catalog.current_artifacts().get("sequences", {}).get("content_hash")
    latest: dict[str, Any] = {}
    for run in ws.catalog.runs("baseline", "done"):  # newest first: the latest run of each model
        if run.inputs.get("artifact:sequences") == current:
            latest.setdefault(run.config.get("model"), run)
    candidates = [(model, {n: run.result["metrics"][n] for n in names if n in run.result.get("metrics", {})}, run)
                  for model, run in latest.items()]
    candidates = [c for c in candidates if c[1]]
    if not candidates:
        return None
    key = "ndcg@10" if all("ndcg@10" in c[1] for c in candidates) else next(iter(candidates[0][1]))
    model, metrics, run = max(candidates, key=lambda c: c[1].get(key, -1.0))
    return {"model": model, "run_id": run.run_id, "metrics": metrics}


def _write_metrics(ctx: StageContext, cfg: EvaluateConfig, n_users: int, rows: dict[str, dict[str, float]]) -> None:
    records = []
    for method, values in rows.items():
        for name, value in values.items():
            metric, k = name.split("@")
            records.append({"run_id": ctx.run_id, "split": cfg.split, "method": method, "metric": metric,
                            "k": int(k), "value": float(value), "n_users": n_users})
    table = pa.Table.from_pylist(records, schema=SPECS["metrics"].schema)
    write_arrow(table, ctx.output("metrics"), ctx.metadata("metrics", {"split": cfg.split}))
