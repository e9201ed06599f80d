"""What serving needs from a trained model, from a workspace or from one exported file.

`Served` holds the recommender, the semantic IDs it decodes with (the checkpoint's `codes`: in modes
joint and bilevel the trained IDs, which `trained_semantic_ids.parquet` also holds), the raw item keys
(and titles) by item id, each item's interaction count for the popularity fallback, and the history
length the model was trained with.

The `--format torch` export is that, in one `torch.save` file of tensors, strings and numbers (loaded with
`weights_only=True`: no pickled code runs), so a serving box needs neither the workspace nor its catalog.
Per-user histories are not in it: such a box serves `--histories`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from bloger_cli import __version__
from bloger_cli.artifacts import SPECS, read_table
from bloger_cli.data.samples import max_history
from bloger_cli.errors import ArtifactError, DamagedFile
from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.model import Recommender
from bloger_cli.tokenizer.io import read_codes
from bloger_cli.training.checkpoint import build_recommender, check_trained_on, load_checkpoint
from bloger_cli.workspace import Workspace

log = logging.getLogger(__name__)

FILE_FORMAT = "bloger-model"  # the "format" entry of an export-model --format torch file
FILE_VERSION = 1


@dataclass
class Served:
    """A trained recommender with everything needed to turn item keys into recommendations."""

    model: Recommender  # eval mode, on the CPU until moved
    codes: Tensor  # (N, L') int64: the IDs the model decodes with, by item id
    item_keys: pa.Array  # (N,) string: raw keys by item id
    titles: pa.Array | None  # (N,) string, or None when the items have no title
    popularity: Tensor  # (N,) int64 interactions per item (the fallback ranks by it)
    max_history: int  # items of history the model reads, as in training
    source: str  # the checkpoint or file, for messages
    mode: str | None = None  # fixed, joint or bilevel

    @property
    def num_items(self) -> int:
        return len(self.codes)

    def to_file_dict(self) -> dict[str, Any]:
        """The `--format torch` export: plain values and tensors only."""
        c = self.model.config
        return {
            "format": FILE_FORMAT, "version": FILE_VERSION, "bloger_version": __version__, "mode": self.mode,
            "model_config": c.to_dict(), "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "codes": self.codes.to(torch.int32).cpu(), "item_keys": self.item_keys.to_pylist(),
            "titles": None if self.titles is None else self.titles.to_pylist(),
            "popularity": self.popularity.cpu(), "max_history": self.max_history,
            "vocab": {"pad": 0, "eos": 1, "levels": c.levels, "codebook_size": c.codebook_size,
                      "size": c.vocab_size},
        }


def from_workspace(ws: Workspace, checkpoint: Path | None) -> Served:
    """The workspace's trained model (best.pt unless `checkpoint`), checked against its sequences and IDs."""
    infos = ws.inputs("sequences", "items")
    path = Path(checkpoint) if checkpoint is not None else ws.path("checkpoint")
    ckpt = load_checkpoint(path)
    check_trained_on(ckpt, path, infos["sequences"])
    codes = ckpt["codes"].long()  # (N, L') the IDs the model was trained with
    check_layout(ckpt, path, ws)
    items = read_table(infos["items"].path, SPECS["items"])
    if items.num_rows != len(codes):
        raise ArtifactError(f"checkpoint {path} has IDs for {len(codes)} items, {infos['items'].path} has "
                            f"{items.num_rows}", hint="re-run `bloger train-bilevel` here")
    order = np.argsort(items.column("item_id").to_numpy())
    items = items.take(pa.array(order))
    titles = items.column("title").combine_chunks() if "title" in items.column_names else None
    return Served(build_recommender(ckpt, path), codes, items.column("item_key").combine_chunks(), titles,
                  torch.from_numpy(items.column("n_interactions").to_numpy().astype(np.int64)),
                  max_history(infos["sequences"].path), str(path), ckpt.get("mode"))


def workspace_ids(ws: Workspace) -> Path:
    """The semantic IDs the workspace serves: the trained ones when a train-bilevel run wrote them."""
    trained = ws.path("trained_semantic_ids")
    return trained if trained.is_file() else ws.path("semantic_ids")


def check_layout(ckpt: dict[str, Any], path: Path, ws: Workspace) -> None:
    """The checkpoint's ID layout (items, codes per ID, codes per level) must be the workspace's."""
    ids = workspace_ids(ws)
    codes, meta = read_codes(ids)
    have = (len(ckpt["codes"]), ckpt["codes"].shape[1], int(ckpt["model_config"]["codebook_size"]))
    want = (len(codes), codes.shape[1], int(meta.get("codebook_size", codes.max().item() + 1)))
    if have != want:
        raise DamagedFile(
            f"checkpoint {path} decodes {have[0]} items with IDs of {have[1]} codes from {have[2]}, "
            f"{ids} has {want[0]} items with IDs of {want[1]} codes from {want[2]}",
            hint="serve a checkpoint trained on this workspace's IDs, or re-run `bloger train-bilevel`")


def from_file(path: Path) -> Served:
    """A `bloger export-model --format torch` file."""
    if not path.is_file():
        raise ArtifactError(f"--model {path}: file not found", hint="write one with `bloger export-model`")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise DamagedFile(f"--model {path} is not a readable model file ({type(exc).__name__})",
                            hint="write one with `bloger export-model --format torch`") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise DamagedFile(f"--model {path} is not a `bloger export-model` file",
                            hint="write one with `bloger export-model --format torch`")
    if data.get("version") != FILE_VERSION:
        raise DamagedFile(f"--model {path} has format version {data.get('version')}, this bloger reads "
                            f"{FILE_VERSION}", hint="export it again with this bloger")
    model = Recommender(RecommenderConfig(**data["model_config"]))
    model.load_state_dict(data["model"])
    titles = None if data["titles"] is None else pa.array(data["titles"], pa.string())
    return Served(model.eval(), data["codes"].long(), pa.array(data["item_keys"], pa.string()), titles,
                  data["popularity"].long(), int(data["max_history"]), str(path), data.get("mode"))
