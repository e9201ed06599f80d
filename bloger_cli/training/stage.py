"""`bloger train-bilevel`: sequences + semantic IDs (+ tokenizer) -> best.pt, last.pt, history.parquet,
trained_semantic_ids.parquet and trained_tokenizer.pt.

The run writes `WORKSPACE/training/last.pt` (and `best.pt`) after every epoch; `--resume` continues
from there. Only a run that finishes replaces the workspace's artifacts, so a failed or killed run
never damages the previous model.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from bloger_cli.artifacts import SPECS, ArtifactInfo, load_torch, save_torch, write_arrow
from bloger_cli.config import TrainBilevelConfig, config_hash
from bloger_cli.errors import ConfigError, DataError, Interrupted
from bloger_cli.progress import Steps
from bloger_cli.recommender.model import Recommender, RecommenderConfig
from bloger_cli.recommender.vocab import Vocab
from bloger_cli.training.checkpoint import check_resumable, in_progress_dir, load_checkpoint, save_atomic
from bloger_cli.training.data import Samples, load_split, read_codes, training_items
from bloger_cli.training.distributed import Distributed
from bloger_cli.training.loop import Stopped, fit
from bloger_cli.training.state import TrainData, TrainState, new_state
from bloger_cli.training.steps import make_step
from bloger_cli.training.runtime import resolve_device, seed_everything, stop_on_sigint
from bloger_cli.workspace import StageContext, StageResult, Workspace, raw_fingerprint, run_stage

log = logging.getLogger(__name__)

INPUT_KINDS = ("sequences", "semantic_ids", "tokenizer")  # + embeddings in modes joint and bilevel


def run(cfg: TrainBilevelConfig, ws: Workspace, *, force: bool = False, lock_timeout: float = 60.0,
        resume: bool = False) -> StageResult:
    """Train the recommender (a no-op when inputs and config are unchanged, unless forced or resuming).

    Under torchrun, rank 0 runs the stage as one process would (lock, catalog, every file written) and
    tells the other ranks whether it trains; they read the same inputs and train beside it."""
    dist = Distributed.from_env()
    try:
        return _run(cfg, ws, dist, force=force, lock_timeout=lock_timeout, resume=resume)
    finally:
        dist.close()


def _run(cfg: TrainBilevelConfig, ws: Workspace, dist: Distributed, *, force: bool, lock_timeout: float,
         resume: bool) -> StageResult:
    if not dist.main:
        infos, inputs = dist.broadcast(None)
        if not dist.broadcast(None):  # rank 0 found the stage up to date, or failed before training
            return StageResult("train-bilevel", "", True, {})
        return StageResult("train-bilevel", "", False, _train(None, cfg, infos, inputs, resume, dist, ws.root))
    training = False

    def body(ctx: StageContext) -> dict[str, Any]:
        nonlocal training
        training = dist.broadcast(True)
        return _train(ctx, cfg, infos, inputs, resume, dist, ws.root)

    try:
        infos = ws.inputs(*INPUT_KINDS, *(("embeddings",) if cfg.mode != "fixed" else ()))
        inputs = {f"artifact:{kind}": info.content_hash for kind, info in infos.items()}
        if cfg.warm_start is not None:
            warm = warm_checkpoint_path(cfg.warm_start)
            inputs[f"file:{warm.resolve()}"] = raw_fingerprint(warm)
    except BaseException:
        dist.broadcast((None, None))
        raise
    dist.broadcast((infos, inputs))  # the other ranks never open the catalog
    try:
        last = in_progress_dir(ws.root) / SPECS["last_checkpoint"].filename
        if resume and not last.is_file():
            raise ConfigError(f"nothing to resume in {ws.root}: no interrupted run ({last} does not exist)",
                              hint="start the run without --resume")
        return run_stage(ws, "train-bilevel", cfg, inputs, body, force=force or resume, lock_timeout=lock_timeout)
    finally:
        if not training:
            dist.broadcast(False)


def warm_checkpoint_path(source: Path) -> Path:
    """The checkpoint a --warm-start names: a file, or a workspace's best.pt."""
    if source.is_file():
        return source
    if source.is_dir():
        path = source / SPECS["checkpoint"].filename
        if path.is_file():
            return path
        raise ConfigError(f"--warm-start {source}: the workspace has no trained recommender (no {path.name})",
                          hint="run `bloger train-bilevel` there first, or pass a checkpoint file")
    raise ConfigError(f"--warm-start {source}: no such workspace or file")


def warm_start(model: Recommender, source: Path) -> None:
    """Load an earlier run's recommender weights into `model`; the model size and the ID layout (levels,
    codes per level) must be the same, else a clear error naming what differs."""
    path = warm_checkpoint_path(source)
    ckpt = load_checkpoint(path)
    have, want = ckpt["model_config"], model.config.to_dict()
    free = ("dropout", "attention_dropout")  # training settings; everything else fixes shapes or layout
    diff = [f"{key} {have.get(key)} (now {want[key]})" for key in want if key not in free and have.get(key) != want[key]]
    if diff:
        raise ConfigError(f"--warm-start {path} does not fit this run: {', '.join(diff)}",
                          hint="keep the earlier run's model settings and tokenize levels / codebook size, "
                          "or start without --warm-start")
    model.load_state_dict(ckpt["model"])
    log.info("recommender weights from %s (epoch %d)", path, int(ckpt["epoch"]))


def load_data(cfg: TrainBilevelConfig, infos: dict[str, ArtifactInfo]) -> tuple[TrainData, int]:
    """Training samples, the validation sample and the semantic IDs; returns (data, tokenizer levels L)."""
    codes, meta = read_codes(infos["semantic_ids"].path)  # (N, L')
    sequences = infos["sequences"].path
    train, valid = load_split(sequences, "train"), load_split(sequences, "valid")
    for name, samples in (("training", train), ("validation", valid)):
        largest = int(max(samples.history.max(), samples.target.max()))
        if largest >= len(codes):
            raise DataError(f"{sequences}: {name} item id {largest} has no semantic ID ({len(codes)} items in "
                            f"{infos['semantic_ids'].path})", hint="re-run `bloger embed` and `bloger tokenize`")
    if cfg.train.val_users is not None and cfg.train.val_users < len(valid):
        pick = torch.randperm(len(valid), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train.val_users]
        valid = valid.select(pick.sort().values)  # a fixed sample: the same users every epoch
    vocab = Vocab(codes.shape[1], int(meta["codebook_size"]))
    weights = torch.bincount(training_items(sequences), minlength=len(codes)).double()
    return TrainData(train, valid, codes, torch.arange(len(codes)), vocab, item_weights=weights), int(meta["levels"])


def load_tokenizer_side(cfg: TrainBilevelConfig, infos: dict[str, ArtifactInfo], n_items: int):
    """Modes joint and bilevel: the trainable tokenizer and every item's embedding (N, D) by item id."""
    from bloger_cli.tokenizer.rqvae import RQVAE
    from bloger_cli.tokenizer.stage import embedding_dim, load_tokenizer, read_embeddings

    path = infos["embeddings"].path
    tokenizer = load_tokenizer(infos["tokenizer"].path, input_dim=embedding_dim(path))
    if not isinstance(tokenizer, RQVAE):
        raise ConfigError(f"--mode {cfg.mode} trains the tokenizer, but {infos['tokenizer'].path} is residual "
                          "k-means, which has no trainable encoder",
                          hint="re-run `bloger tokenize --method rqvae`, or train with --mode fixed")
    item_ids, x = read_embeddings(path)
    if len(item_ids) != n_items or int(item_ids.max()) != n_items - 1:
        raise DataError(f"{path}: embeddings cover {len(item_ids)} items, the semantic IDs {n_items}",
                        hint="re-run `bloger embed` and `bloger tokenize`")
    embeddings = torch.empty_like(x)
    embeddings[item_ids] = x
    return tokenizer, embeddings


def _train(ctx: StageContext | None, cfg: TrainBilevelConfig, infos: dict[str, ArtifactInfo],
           inputs: dict[str, str], resume: bool, dist: Distributed, root: Path) -> dict[str, Any]:
    """The training itself; ctx is None on the ranks other than 0 of a torchrun, which write nothing."""
    started = time.perf_counter()
    with Steps("train-bilevel") as steps:
        steps.step("reading samples and semantic IDs")
        data, soft_levels = load_data(cfg, infos)
        tokenizer = None
        if cfg.mode != "fixed":
            tokenizer, embeddings = load_tokenizer_side(cfg, infos, len(data.codes))
        device = dist.device(resolve_device(cfg.device))
        seed_everything(cfg.seed)  # before the weights are initialised
        model_config = RecommenderConfig(levels=data.vocab.levels, codebook_size=data.vocab.codebook_size,
                                         soft_levels=soft_levels, **cfg.model.model_dump())
        model = Recommender(model_config)
        if cfg.warm_start is not None:
            warm_start(model, cfg.warm_start)
        model = model.to(device)
        steps_per_epoch = -(-len(data.train) // cfg.batch_size)
        if tokenizer is not None:
            tokenizer = tokenizer.to(device)
        state = new_state(model, cfg, steps_per_epoch, tokenizer)
        state.dist, state.net = dist, dist.wrap(model)
        if cfg.train.compile:
            state.net = torch.compile(state.forward)
        scratch = in_progress_dir(root)
        cfg_hash = config_hash(cfg)
        if resume:
            ckpt = load_checkpoint(scratch / "last.pt")
            check_resumable(ckpt, scratch / "last.pt", cfg_hash, cfg.model_dump(mode="json"), inputs)
            state.load_state_dict(ckpt)
            data.codes = ckpt["codes"].long()  # the IDs of the tokenizer as it was (bilevel and joint change them)
            log.info("resuming after epoch %d (step %d)", state.epoch, state.step)
        elif (scratch / "last.pt").is_file() and dist.main:
            log.warning("starting afresh: the interrupted run in %s is discarded (use --resume to continue it)",
                        scratch)
        data = TrainData(Samples(*(t.to(device) for t in data.train)), data.valid, data.codes.to(device),
                         data.item_ids, data.vocab, None if tokenizer is None else embeddings.to(device),
                         data.train_lengths, data.item_weights)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("training %s parameters on %d samples (%d steps per epoch) on %s%s", f"{n_params:,}",
                 len(data.train), steps_per_epoch, device,
                 f" and {dist.world - 1} more processes" if dist.enabled else "")
        fixed = {"model_config": model_config.to_dict(), "config": cfg.model_dump(mode="json"),
                 "config_hash": cfg_hash, "inputs": inputs, "mode": cfg.mode}

        def save(state: TrainState, improved: bool) -> None:
            if ctx is None:
                return
            ckpt = {**fixed, **state.state_dict(), "codes": data.codes.to(torch.int32).cpu()}
            save_atomic(ckpt, scratch / "last.pt", ctx.metadata("last_checkpoint", {"mode": cfg.mode}))
            if improved:
                save_atomic(ckpt, scratch / "best.pt", ctx.metadata("checkpoint", {"mode": cfg.mode}))

        steps.step(f"training ({cfg.mode})")
        with stop_on_sigint(enabled=not dist.enabled) as stop:
            try:
                def due(state: TrainState) -> bool:  # the same on every rank, whatever its clock says
                    flag = state.plan.update_due(state.step, state.epoch + 1, state.clock.elapsed())
                    return dist.any_(flag, device) if cfg.train.time_budget is not None else flag

                fit(state, data, cfg, make_step(cfg, data, device, due), device, save, stop)
            except Stopped:
                where = f"epoch {state.epoch + 1}, step {state.epoch_step}" if state.epoch_step else \
                    f"the end of epoch {state.epoch}"
                raise Interrupted(f"at {where} of {cfg.epochs}; the state is saved in {scratch / 'last.pt'}",
                                  hint=f"continue with `bloger train-bilevel -w {root} --resume` and the same "
                                  "config and options") from None
        if ctx is not None:
            steps.step("writing artifacts")
            _write_outputs(ctx, cfg, state, data, infos)
            shutil.rmtree(scratch, ignore_errors=True)
    epochs = [r for r in state.history if r.get("event", "epoch") == "epoch"]
    updates = [r for r in state.history if r.get("event") == "tokenizer_update"]
    validated = [r for r in state.history if r.get("event") in ("epoch", "eval") and r.get("val_ndcg_10") is not None]
    best_row = next((r for r in validated if r["step"] == state.best_step), {})
    recoded = [r for r in updates if "churn" in r]
    tokenizer_side = {} if cfg.mode == "fixed" else {
        "tokenizer_updates": len(updates) if cfg.mode == "bilevel" else state.step,
        **({k: updates[-1][k] for k in ("collision_rate", "level1_density", "level1_entropy", "conflict_fraction")
            if k in updates[-1]} if updates else {}),
        **({"mean_churn": float(np.mean([r["churn"] for r in recoded])) if recoded else None,
            "mean_churn_weighted": float(np.mean([r.get("churn_weighted", r["churn"]) for r in recoded]))
            if recoded else None, "updates_skipped": len(updates) - len(recoded)} if updates else {}),
    }
    return {
        "mode": cfg.mode, "epochs_run": state.epoch, "best_epoch": state.best_epoch, "best_step": state.best_step,
        "steps": state.step, "skipped_steps": state.bad.skipped, "elapsed": round(state.clock.elapsed(), 3),
        "metric": cfg.train.metric, "best_value": state.best, "val_recall@10": best_row.get("val_recall_10"),
        "val_ndcg@10": best_row.get("val_ndcg_10"), "train_samples": len(data.train),
        "val_users": len(data.valid), "parameters": n_params, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type,
        # medians: the first epoch of a compiled run (and of each resumed part) also pays for the compile
        "seconds_per_epoch": round(float(np.median([r["seconds"] for r in epochs])), 3),
        "samples_per_s": round(float(np.median([r["samples_per_s"] for r in epochs])), 1),
        **tokenizer_side, "seconds": round(time.perf_counter() - started, 3),
    }


def _write_outputs(ctx: StageContext, cfg: TrainBilevelConfig, state: TrainState, data: TrainData,
                   infos: dict[str, ArtifactInfo]) -> None:
    scratch = in_progress_dir(ctx.workspace.root)
    if not (scratch / "best.pt").is_file():  # no validation ever improved (a NaN metric): keep the last
        log.warning("no validation improved on the run's weights (budget too short, or a metric that is not a "
                    "number): best.pt holds the last weights")
        last = load_checkpoint(scratch / "last.pt")
        last.pop("metadata")
        save_atomic(last, scratch / "best.pt", ctx.metadata("checkpoint", {"mode": cfg.mode}))
    os.replace(scratch / "best.pt", ctx.output("checkpoint"))
    os.replace(scratch / "last.pt", ctx.output("last_checkpoint"))
    meta = {"mode": cfg.mode}
    base = SPECS["history"].schema
    extras = sorted({key for row in state.history for key in row} - set(base.names))
    schema = pa.schema([*base, *[(name, pa.float64()) for name in extras]])
    rows = [{name: row.get(name) for name in schema.names} for row in state.history]
    write_arrow(pa.Table.from_pylist(rows, schema=schema), ctx.output("history"), ctx.metadata("history", meta))
    best = load_checkpoint(ctx.output("checkpoint"))  # the IDs and tokenizer the best model decodes with
    codes = best["codes"].long()
    flat = pa.array(codes.flatten().numpy().astype(np.int16))
    ids = pa.table({"item_id": pa.array(data.item_ids.numpy().astype(np.int32)),
                    "codes": pa.FixedSizeListArray.from_arrays(flat, codes.shape[1])})
    source_meta = infos["semantic_ids"].meta
    write_arrow(ids, ctx.output("trained_semantic_ids"),
                ctx.metadata("trained_semantic_ids", {**source_meta, **meta}))
    tokenizer = load_torch(infos["tokenizer"].path, SPECS["tokenizer"])
    tokenizer.pop("metadata")
    if "tokenizer_state" in best:  # joint and bilevel: the trained tokenizer, in tokenize's format
        tokenizer["state_dict"] = best["tokenizer_state"]
    save_torch(tokenizer, ctx.output("trained_tokenizer"), ctx.metadata("trained_tokenizer", {**source_meta, **meta}))
