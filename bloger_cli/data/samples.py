"""Training and evaluation samples as tensors: a split of the sequences artifact (leave-one-out,
`data/splits.py`) becomes padded item-id tensors once, and batches are cut from them by index.

    history (S, H) item ids, left-aligned, -1 = padding;  target (S,) item id
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from bloger_cli.artifacts import SPECS, read_info, read_table
from bloger_cli.data.splits import Split, split_query
from bloger_cli.errors import DataError


class Samples(NamedTuple):
    """One split: a history and a target per sample (CPU tensors)."""

    user_ids: Tensor  # (S,) int64
    history: Tensor  # (S, H) int64 item ids, left-aligned, -1 after the last item
    target: Tensor  # (S,) int64 item id

    def __len__(self) -> int:
        return len(self.target)

    def select(self, index: Tensor) -> Samples:
        return Samples(self.user_ids[index], self.history[index], self.target[index])

    def lengths(self) -> Tensor:
        """(S,) history items per sample (histories are left-aligned: the padding is at the end)."""
        return (self.history >= 0).sum(dim=1)

    def trim(self, width: int) -> Samples:
        """The same samples with only `width` history slots: the padding past the longest sample dropped.
        Histories are left-aligned and relative positions do not move, so every real token's output
        (and the loss) is the same as in a batch padded to the cap (tests/unit/training/test_sampler.py)."""
        return self if width >= self.history.shape[1] else Samples(self.user_ids, self.history[:, :width], self.target)


def max_history(sequences: Path) -> int:
    """The history length `bloger prepare` chose (stored in the sequences artifact's metadata)."""
    meta = read_info(sequences, SPECS["sequences"]).meta
    return int(meta.get("max_history", 20))


def load_split(sequences: Path, split: Split, history: int | None = None) -> Samples:
    """All samples of a split from the sequences artifact (leave-one-out SQL, then padded tensors)."""
    history = history or max_history(sequences)
    table = read_table(sequences, SPECS["sequences"], columns=["user_id", "items"])
    con = duckdb.connect()
    try:
        con.register("sequences", table)
        result = con.sql(split_query("sequences", split, history)).to_arrow_table()
    finally:
        con.close()
    if result.num_rows == 0:
        raise DataError(f"{sequences}: no {split} samples (every user needs at least 3 items)",
                        hint="re-run `bloger prepare` with lower --min-user-interactions or more data")
    return Samples(
        torch.from_numpy(result.column("user_id").to_numpy().astype(np.int64)),
        _pad_lists(result.column("history").combine_chunks(), history),
        torch.from_numpy(result.column("target").to_numpy().astype(np.int64)),
    )


def _pad_lists(column: pa.ListArray, width: int) -> Tensor:
    """A list<int> column -> (S, width) int64, left-aligned, -1 padded (vectorised via the offsets)."""
    offsets = column.offsets.to_numpy()
    values = column.flatten().to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    out = np.full((len(column), width), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(column)), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, cols] = values
    return torch.from_numpy(out)


def training_items(sequences: Path) -> Tensor:
    """Every item occurrence in the training part of the sequences (all but the last two per user)."""
    table = read_table(sequences, SPECS["sequences"], columns=["items"])
    con = duckdb.connect()
    try:
        con.register("sequences", table)
        result = con.sql("SELECT unnest(items[1:len(items) - 2]) AS item FROM sequences "
                             "WHERE len(items) >= 3").to_arrow_table()
    finally:
        con.close()
    return torch.from_numpy(result.column("item").to_numpy().astype(np.int64))
