"""`bloger embed`: items.parquet -> embeddings.parquet (item_id int32, embedding fixed_size_list<float32>[D]).

Each item's text (a template over its text fields, see `text.py`) is encoded by a sentence-transformers
model; distinct texts are encoded once and looked up in the workspace's text cache first (`cache.py`), so
a re-run after new items arrive encodes only the new or changed texts. Or `--from-file` imports a
precomputed matrix (`matrix.py`), whose file fingerprint is a stage input: a changed file re-runs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bloger_cli.artifacts import SPECS, ArtifactInfo, read_table, write_arrow
from bloger_cli.config import EmbedConfig
from bloger_cli.embed import encoder, matrix
from bloger_cli.embed.cache import TextCache, text_hash
from bloger_cli.embed.text import Template, render_texts, resolve_template
from bloger_cli.errors import DataError
from bloger_cli.runtime import resolve_device
from bloger_cli.workspace import StageContext, StageResult, Workspace, raw_fingerprint, run_stage

log = logging.getLogger(__name__)

_EXAMPLES = 5  # item keys named when some items have no text
_BASE_COLUMNS = SPECS["items"].schema.names


def run(cfg: EmbedConfig, ws: Workspace, *, force: bool = False, lock_timeout: float = 60.0) -> StageResult:
    """Run the embed stage on a workspace (a no-op when items.parquet and the config are unchanged)."""
    items = ws.inputs("items")["items"]
    inputs = {"artifact:items": items.content_hash}
    body: Callable[[StageContext], dict[str, Any]]
    if cfg.from_file is not None:
        path = matrix.check_path(cfg.from_file)
        inputs[f"file:{path}"] = raw_fingerprint(path)
        body = partial(_import, cfg=cfg, info=items, path=path)
    else:
        template = resolve_template(cfg.template, cfg.fields, text_fields(items.path))
        ref = encoder.resolve_model(cfg.model)  # a missing directory fails here, before the stage starts
        body = partial(_encode, cfg=cfg, info=items, template=template, ref=ref)
    return run_stage(ws, "embed", cfg, inputs, body, force=force, lock_timeout=lock_timeout)


def text_fields(items_path: Path) -> list[str]:
    """The items artifact's text columns, in file order (from the schema: no data read)."""
    return [name for name in pq.read_schema(items_path).names if name not in _BASE_COLUMNS]


def _read_items(info: ArtifactInfo, fields: list[str]) -> pa.Table:
    table = read_table(info.path, SPECS["items"], columns=["item_id", "item_key", *fields])
    return table.sort_by("item_id")


def _encode(ctx: StageContext, cfg: EmbedConfig, info: ArtifactInfo, template: Template,
            ref: encoder.ModelRef) -> dict[str, Any]:
    start = time.perf_counter()
    items = _read_items(info, template.fields)
    n_items = items.num_rows
    texts = render_texts(template, {f: items.column(f).to_pylist() for f in template.fields}, n_items)
    keep, n_missing, notes = _missing_text(cfg, template, texts, items.column("item_key").to_pylist())
    ids = items.column("item_id").to_numpy()[keep]  # (N,)
    texts = [texts[i] for i in keep]
    if not texts:
        raise DataError(f"{info.path}: no item has text, so nothing is left to embed",
                        hint="use --on-missing-text empty, another --template, or --from-file")
    device = resolve_device(cfg.device)
    vectors, from_cache, encoded = _vectors(ctx.workspace, ref, device, cfg.batch_size, texts)  # (N, D)
    if cfg.normalize:
        vectors = _l2_normalize(vectors)
    meta = {"model": cfg.model, "model_source": ref.source, "dim": int(vectors.shape[1]), "template": template.text,
            "normalize": cfg.normalize, "device": str(device), "precision": encoder.precision(device),
            "skipped": n_items - len(ids)}
    _write(ctx, ids, vectors, meta)
    return {"items": n_items, "embedded": len(ids), "skipped_items": n_items - len(ids),
            "items_without_text": n_missing, "from_cache": from_cache, "newly_encoded": encoded,
            "dim": int(vectors.shape[1]), "model": cfg.model, "template": template.text, "device": str(device),
            "seconds": round(time.perf_counter() - start, 2), "notes": notes}


def _missing_text(cfg: EmbedConfig, template: Template, texts: list[str],
                  keys: list[str]) -> tuple[np.ndarray, int, list[str]]:
    """(positions of the items to embed, items without text, notes); on_missing_text=error refuses them."""
    missing = [i for i, t in enumerate(texts) if not t]
    if not missing:
        return np.arange(len(texts)), 0, []
    where = (f"under template {template.text!r}" if template.fields
             else "(items.parquet has no text fields: the source had no item metadata)")
    what = (f"{len(missing):,} of {len(texts):,} items have no text {where} "
            f"(e.g. item keys {', '.join(keys[i] for i in missing[:_EXAMPLES])})")
    if cfg.on_missing_text == "error":
        raise DataError(what, hint="pass --on-missing-text skip (leave them out) or --on-missing-text empty "
                                   "(embed the empty string), or import vectors with --from-file")
    log.info("%s: %s", what, "left out" if cfg.on_missing_text == "skip" else "embedded from ''")
    if cfg.on_missing_text == "skip":
        return np.array([i for i, t in enumerate(texts) if t], dtype=np.int64), len(missing), [f"{what}: left out"]
    return np.arange(len(texts)), len(missing), [f"{what}: embedded from the empty string"]


def _vectors(ws: Workspace, ref: encoder.ModelRef, device: torch.device, batch_size: int,
             texts: list[str]) -> tuple[np.ndarray, int, int]:
    """(vectors (N, D) float32 for `texts`, distinct texts found in the cache, distinct texts encoded)."""
    unique = list(dict.fromkeys(texts))  # distinct texts, first-seen order
    hashes = [text_hash(t) for t in unique]
    cache = TextCache(ws.root / "cache" / f"embed-{ref.slug()}-{encoder.precision(device)}.parquet")
    todo = np.flatnonzero(cache.rows(hashes) < 0)  # (U_new,)
    log.info("%d items, %d distinct texts: %d cached, %d to encode", len(texts), len(unique),
             len(unique) - len(todo), len(todo))
    if len(todo):
        model = encoder.load_model(ref, device)
        pending = [unique[i] for i in todo]
        try:
            for idx, vecs in encoder.encode_batches(model, pending, batch_size):
                _check_output(ref, [pending[i] for i in idx], vecs)  # before anything bad enters the cache
                cache.add([hashes[todo[i]] for i in idx], vecs)
                cache.checkpoint()
        finally:
            cache.save()  # keep what was encoded, even when interrupted
    position = {t: i for i, t in enumerate(unique)}
    vectors = cache.vectors(hashes)[[position[t] for t in texts]]  # (U, D) -> (N, D)
    return vectors, len(unique) - len(todo), len(todo)


def _check_output(ref: encoder.ModelRef, texts: list[str], vectors: np.ndarray) -> None:
    bad = matrix.first_nonfinite(vectors)
    if bad is not None:
        raise DataError(f"model {ref.name!r} produced a non-finite embedding ({bad[1]}) for the text "
                        f"{texts[bad[0]][:80]!r}", hint="run on --device cpu (fp32), or try another model")


def _l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, 1)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _write(ctx: StageContext, ids: np.ndarray, vectors: np.ndarray, meta: dict[str, Any]) -> None:
    """item_id int32 + embedding fixed_size_list<float32>[D], built on one flat float32 buffer."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(n * dim), pa.float32())  # (N * D,)
    table = pa.table({"item_id": pa.array(ids, pa.int32()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})
    write_arrow(table, ctx.output("embeddings"), ctx.metadata("embeddings", meta))


def _import(ctx: StageContext, cfg: EmbedConfig, info: ArtifactInfo, path: Path) -> dict[str, Any]:
    start = time.perf_counter()
    items = _read_items(info, [])
    ids = items.column("item_id").to_numpy()  # (N,)
    vectors = matrix.load_matrix(path, ids, items.column("item_key").to_pylist())  # (N, D)
    notes = [f"imported {len(ids):,} vectors from {path}"]
    if cfg.normalize:
        vectors = _l2_normalize(vectors)
        notes.append("the imported vectors were L2-normalised (normalize=true); set normalize=false to keep them")
    dim = int(vectors.shape[1])
    _write(ctx, ids, vectors, {"model": "from_file", "from_file": str(path), "dim": dim, "template": None,
                               "normalize": cfg.normalize, "device": None, "skipped": 0})
    return {"items": len(ids), "embedded": len(ids), "skipped_items": 0, "items_without_text": None,
            "from_cache": 0, "newly_encoded": 0, "dim": dim, "model": "from_file", "from_file": str(path),
            "template": None, "device": None, "seconds": round(time.perf_counter() - start, 2), "notes": notes}
