"""Reading the tokenizer's artifacts: embeddings as tensors, semantic IDs as a code table, and a
trained tokenizer back as a model (checked against the embeddings it will be fed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from bloger_cli.artifacts import SPECS, load_torch, read_info, read_table
from bloger_cli.errors import ArtifactError, ConfigError, DamagedFile, DataError
from bloger_cli.tokenizer.kmeans import RQKMeans, RQKMeansConfig
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.workspace import Workspace


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


def embedding_dim(path: Path) -> int:
    """The width D of an embeddings artifact, from its Parquet schema (no data read)."""
    return pq.read_schema(path).field("embedding").type.list_size


def read_codes(path: Path, num_items: int | None = None) -> tuple[Tensor, dict]:
    """A semantic-IDs artifact as a dense (N, L') int64 code table indexed by item id, and its metadata."""
    info = read_info(path, SPECS[_kind_of(path)])
    table = read_table(path, SPECS[info.kind], columns=["item_id", "codes"])
    ids = table.column("item_id").to_numpy().astype(np.int64)
    column = table.column("codes").combine_chunks()
    width = column.type.list_size
    codes = column.flatten().to_numpy().astype(np.int64).reshape(len(ids), width)
    n = num_items if num_items is not None else (int(ids.max()) + 1 if len(ids) else 0)
    if len(ids) != n or (len(ids) and (ids.min() < 0 or ids.max() >= n or len(np.unique(ids)) != n)):
        raise ArtifactError(f"{path}: semantic IDs cover {len(np.unique(ids))} item ids, the workspace has "
                            f"{n} items (ids 0..{n - 1})", hint="re-run `bloger embed` and `bloger tokenize`")
    table_out = np.empty((n, width), dtype=np.int64)
    table_out[ids] = codes
    return torch.from_numpy(table_out), info.meta


def _kind_of(path: Path) -> str:
    return "trained_semantic_ids" if path.name == SPECS["trained_semantic_ids"].filename else "semantic_ids"


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
