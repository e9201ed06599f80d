"""`bloger tokenize`: embeddings -> tokenizer.pt, semantic_ids.parquet and codebook_stats.parquet.

`run` trains the RQ-VAE (or fits residual k-means), assigns every item its codes in chunks, appends the
disambiguation code, and records per-level statistics. `load_tokenizer` gives later stages the model
back, checked against the embeddings they will feed it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from bloger_cli.artifacts import SPECS, load_torch, read_table, save_torch, write_arrow
from bloger_cli.config import TokenizeConfig
from bloger_cli.errors import ArtifactError, ConfigError, DamagedFile, DataError
from bloger_cli.progress import Steps
from bloger_cli.tokenizer.kmeans import RQKMeans, RQKMeansConfig
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.tokenizer.semantic_ids import semantic_ids
from bloger_cli.tokenizer.trainer import train_rqvae
from bloger_cli.training.runtime import resolve_device, seed_everything
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


def warm_tokenizer_path(source: Path) -> Path:
    """The tokenizer a --warm-start names: a file, or a workspace's trained tokenizer (what its
    train-bilevel ended with) or else its tokenize output."""
    if source.is_file():
        return source
    if source.is_dir():
        ws = Workspace(source)
        for kind in ("trained_tokenizer", "tokenizer"):
            if ws.path(kind).is_file():
                return ws.path(kind)
        raise ConfigError(f"--warm-start {source}: the workspace has no tokenizer (no {SPECS['tokenizer'].filename})",
                          hint="run `bloger tokenize` there first, or pass a tokenizer file")
    raise ConfigError(f"--warm-start {source}: no such workspace or file")


def _check_warm(model: nn.Module, cfg: TokenizeConfig, input_dim: int, path: Path) -> None:
    """A warm-start tokenizer must have the layout the config asks for: the same method, levels, codes
    per level and (RQ-VAE) widths, so that its IDs stay compatible."""
    want = build_model(cfg, input_dim).config.to_dict()
    have = model.config.to_dict()
    method = "rq-kmeans" if isinstance(model, RQKMeans) else "rqvae"
    diff = [f"{key} {have[key]} (config: {want[key]})" for key in ("levels", "codebook_size", "code_dim", "hidden")
            if key in want and key in have and have[key] != want[key]]
    if method != cfg.method:
        diff.insert(0, f"method {method} (config: {cfg.method})")
    if diff:
        raise ConfigError(f"--warm-start {path} does not fit the config: {', '.join(diff)}",
                          hint="use the earlier run's tokenize settings, or start without --warm-start")


def read_embeddings(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(item ids (N,) int64, embeddings (N, D) float32); refuses empty, null or non-finite rows."""
    table = read_table(path, SPECS["embeddings"], columns=["item_id", "embedding"])
    fix = "re-run `bloger embed --force` (and check the input it embeds)"
    if table.num_rows == 0:
        raise DataError(f"{path} holds no embeddings", hint=fix)
    column = table.column("embedding").combine_chunks()
    ids_col = table.column("item_id")
    if column.null_count or ids_col.null_count:
        raise DataError(f"{path}: {max(column.null_count, ids_col.null_count)} row(s) have a null item_id or "
                        f"embedding", hint=fix)
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # a writable copy
    x = torch.from_numpy(values.reshape(len(column), dim))  # (N, D)
    item_ids = torch.from_numpy(ids_col.to_numpy().astype(np.int64))  # (N,)
    bad = (~torch.isfinite(x).all(dim=1)).nonzero().squeeze(1)
    if len(bad):
        raise DamagedFile(f"{path}: the embedding of item {int(item_ids[bad[0]])} is not finite (NaN or inf); "
                        f"{len(bad)} item(s) affected", hint=fix)
    repeated = len(item_ids) - len(torch.unique(item_ids))
    if repeated:
        raise DataError(f"{path}: item ids are repeated ({repeated} duplicate rows)", hint=fix)
    return item_ids, x


def build_model(cfg: TokenizeConfig, input_dim: int) -> RQVAE | RQKMeans:
    if cfg.method == "rq-kmeans":
        return RQKMeans(RQKMeansConfig(input_dim, cfg.levels, cfg.codebook_size))
    return RQVAE(RQVAEConfig.resolve(input_dim, cfg.code_dim, cfg.levels, cfg.codebook_size, cfg.hidden,
                                     cfg.dropout, cfg.commitment))


def fit_tokenizer(cfg: TokenizeConfig, x: torch.Tensor, device: torch.device,
                  warm: Path | None = None) -> tuple[nn.Module, int]:
    """A trained RQ-VAE or fitted residual k-means on `device` (from `warm`'s weights when given: an
    RQ-VAE then trains on without k-means init, residual k-means is kept as is); returns (model, epochs run)."""
    generator = seed_everything(cfg.seed)  # seeds the weight init too, so it comes first
    if warm is None:
        model = build_model(cfg, x.shape[1])
    else:
        model = load_tokenizer(warm, input_dim=x.shape[1]).train()
        _check_warm(model, cfg, x.shape[1], warm)
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


def embedding_dim(path: Path) -> int:
    """The width D of an embeddings artifact, from its Parquet schema (no data read)."""
    return pq.read_schema(path).field("embedding").type.list_size


def load_tokenizer(source: Workspace | Path | str, *, input_dim: int | None = None) -> RQVAE | RQKMeans:
    """The tokenizer of a workspace (or a tokenizer.pt path), in eval mode on the CPU.

    The checkpoint's input dimension must match `input_dim`, or, for a workspace, its embeddings.
    """
    if isinstance(source, Workspace):
        path = source.path("tokenizer")
        if input_dim is None and source.path("embeddings").is_file():
            input_dim = embedding_dim(source.path("embeddings"))
    else:
        path = Path(source)
    ckpt = _load_checkpoint(path)
    model: RQVAE | RQKMeans = (RQKMeans(RQKMeansConfig(**ckpt["config"])) if ckpt["method"] == "rq-kmeans"
                               else RQVAE(RQVAEConfig(**ckpt["config"])))
    if input_dim is not None and input_dim != model.input_dim:
        raise ArtifactError(
            f"tokenizer {path} was trained on {model.input_dim}-d embeddings, but the embeddings are "
            f"{input_dim}-d",
            hint="re-run `bloger tokenize` or use embeddings of the matching dimension",
        )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:  # weights that do not fit the stored config: a damaged checkpoint
        raise ArtifactError(f"{path}: the weights do not fit the stored config ({str(exc).splitlines()[0]})",
                            hint="re-run `bloger tokenize --force`") from None
    return model.eval()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    kind = "trained_tokenizer" if path.name == SPECS["trained_tokenizer"].filename else "tokenizer"
    try:
        ckpt = load_torch(path, SPECS[kind])
    except ArtifactError:  # a renamed copy of the other kind (tokenize's or train-bilevel's) is fine too
        ckpt = load_torch(path, SPECS["tokenizer" if kind == "trained_tokenizer" else "trained_tokenizer"])
    if ckpt.get("method") not in ("rqvae", "rq-kmeans") or not isinstance(ckpt.get("config"), dict) \
            or not isinstance(ckpt.get("state_dict"), dict):
        raise ArtifactError(f"{path} is not a bloger tokenizer checkpoint (method, config or weights missing)",
                            hint="re-run `bloger tokenize --force`")
    return ckpt
