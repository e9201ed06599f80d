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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from bloger_cli.artifacts import SPECS, ArtifactInfo, load_torch, save_torch, write_arrow
from bloger_cli.config import TrainBilevelConfig, config_hash
from bloger_cli.errors import ConfigError, Interrupted
from bloger_cli.progress import Steps
from bloger_cli.runtime import resolve_device, stop_on_sigint
from bloger_cli.training.checkpoint import check_resumable, in_progress_dir, load_checkpoint, save_atomic
from bloger_cli.training.distributed import Distributed
from bloger_cli.training.loop import Stopped, fit
from bloger_cli.training.result import run_result
from bloger_cli.training.setup import build_run, warm_checkpoint_path
from bloger_cli.training.state import TrainData, TrainState
from bloger_cli.training.steps import make_step
from bloger_cli.training.tracker import TRACKER_DIR, open_tracker
from bloger_cli.workspace import StageContext, StageResult, Workspace, raw_fingerprint, run_flag, run_stage

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
        return StageResult("train-bilevel", "", False, _train(None, cfg, infos, inputs, resume, dist, ws))
    training = False

    def body(ctx: StageContext) -> dict[str, Any]:
        nonlocal training
        training = dist.broadcast(True)
        return _train(ctx, cfg, infos, inputs, resume, dist, ws)

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
        last = in_progress_dir(ws.run_dir) / SPECS["last_checkpoint"].filename
        if resume and not last.is_file():
            raise ConfigError(f"nothing to resume in {ws.run_dir}: no interrupted run ({last} does not exist)",
                              hint="start the run without --resume")
        return run_stage(ws, "train-bilevel", cfg, inputs, body, force=force or resume, lock_timeout=lock_timeout)
    finally:
        if not training:
            dist.broadcast(False)


def _train(ctx: StageContext | None, cfg: TrainBilevelConfig, infos: dict[str, ArtifactInfo],
           inputs: dict[str, str], resume: bool, dist: Distributed, ws: Workspace) -> dict[str, Any]:
    """The training itself; ctx is None on the ranks other than 0 of a torchrun, which write nothing."""
    started = time.perf_counter()
    scratch = in_progress_dir(ws.run_dir)
    with Steps("train-bilevel") as steps:
        steps.step("reading samples and semantic IDs")
        device = dist.device(resolve_device(cfg.device))
        state, data, model_config = build_run(cfg, infos, dist, device)
        if resume:
            _resume(state, data, scratch, cfg, inputs)
        elif (scratch / "last.pt").is_file() and dist.main:
            log.warning("starting afresh: the interrupted run in %s is discarded (use --resume to continue it)",
                        scratch)
        data = data.to(device)
        fixed = {"model_config": model_config.to_dict(), "config": cfg.model_dump(mode="json"),
                 "config_hash": config_hash(cfg), "inputs": inputs, "mode": cfg.mode}

        def save(state: TrainState, improved: bool) -> None:
            if ctx is None:
                return
            ckpt = {**fixed, **state.state_dict(), "codes": data.codes.to(torch.int32).cpu()}
            save_atomic(ckpt, scratch / "last.pt", ctx.metadata("last_checkpoint", {"mode": cfg.mode}))
            if improved:
                save_atomic(ckpt, scratch / "best.pt", ctx.metadata("checkpoint", {"mode": cfg.mode}))

        steps.step(f"training ({cfg.mode})")
        if ctx is not None:  # rank 0 tracks; a resumed run goes on in the directory it started
            state.tracker_run = state.tracker_run or ctx.run_id
            state.tracker = open_tracker(cfg.train.tracker, ws.root / TRACKER_DIR / (ws.run or "") / state.tracker_run,
                                         purge_step=state.step + 1 if resume else None)
        try:
            _fit(state, data, cfg, dist, device, save, scratch, ws)
        finally:
            if state.tracker is not None:
                state.tracker.close()
        if ctx is not None:
            steps.step("writing artifacts")
            _write_outputs(ctx, cfg, state, data, infos)
            shutil.rmtree(scratch, ignore_errors=True)
    return {**run_result(state, data, cfg, device), "seconds": round(time.perf_counter() - started, 3)}


def _resume(state: TrainState, data: TrainData, scratch: Path, cfg: TrainBilevelConfig,
            inputs: dict[str, str]) -> None:
    """Continue the interrupted run saved in `scratch`: the same config and inputs, its weights,
    optimisers, RNG, position and semantic IDs."""
    ckpt = load_checkpoint(scratch / "last.pt")
    check_resumable(ckpt, scratch / "last.pt", config_hash(cfg), cfg.model_dump(mode="json"), inputs)
    state.load_state_dict(ckpt)
    data.codes = ckpt["codes"].long()  # the IDs of the tokenizer as it was (bilevel and joint change them)
    log.info("resuming after epoch %d (step %d)", state.epoch, state.step)


def _fit(state: TrainState, data: TrainData, cfg: TrainBilevelConfig, dist: Distributed, device: torch.device,
         save: Callable[[TrainState, bool], None], scratch: Path, ws: Workspace) -> None:
    """The loop, with Ctrl-C turned into an Interrupted that says how to continue."""
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
                              hint=f"continue with `bloger train-bilevel -w {ws.root}{run_flag(ws)} --resume` "
                              "and the same config and options") from None


def _write_outputs(ctx: StageContext, cfg: TrainBilevelConfig, state: TrainState, data: TrainData,
                   infos: dict[str, ArtifactInfo]) -> None:
    scratch = in_progress_dir(ctx.workspace.run_dir)
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
