"""Training and evaluation samples as tensors, and batches of tokens built from them with tensor ops.

A split (leave-one-out, `data/splits.py`) becomes padded item-id tensors once; a batch then gathers the
current semantic IDs of its items, so when the tokenizer changes the IDs (bi-level modes) nothing is
re-read: the next batch simply gathers from the new code table.

    history (B, H) item ids, -1 = padding --codes (N, L')--> input_ids (B, H*L') item-major tokens
    target (B,) item id                    --codes--------> decoder_input_ids [PAD, c_0..c_{L'-1}] (B, L'+1)
                                                            labels            [c_0..c_{L'-1}, EOS]  (B, L'+1)
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
from bloger_cli.errors import ArtifactError, DataError
from bloger_cli.recommender.vocab import EOS, PAD, Vocab


class Samples(NamedTuple):
    """One split: a history and a target per sample (CPU tensors)."""

    user_ids: Tensor  # (S,) int64
    history: Tensor  # (S, H) int64 item ids, left-aligned, -1 after the last item
    target: Tensor  # (S,) int64 item id

    def __len__(self) -> int:
        return len(self.target)

    def select(self, index: Tensor) -> "Samples":
        return Samples(self.user_ids[index], self.history[index], self.target[index])

    def lengths(self) -> Tensor:
        """(S,) history items per sample (histories are left-aligned: the padding is at the end)."""
        return (self.history >= 0).sum(dim=1)

    def trim(self, width: int) -> "Samples":
        """The same samples with only `width` history slots: the padding past the longest sample dropped.
        Histories are left-aligned and relative positions do not move, so every real token's output
        (and the loss) is the same as in a batch padded to the cap (tests/unit/training/test_sampler.py)."""
        return self if width >= self.history.shape[1] else Samples(self.user_ids, self.history[:, :width], self.target)


class Batch(NamedTuple):
    input_ids: Tensor  # (B, H*L') history tokens, PAD where attention_mask is False
    attention_mask: Tensor  # (B, H*L') bool
    decoder_input_ids: Tensor  # (B, L'+1)
    labels: Tensor  # (B, L'+1)
    history: Tensor  # (B, H) item ids (-1 = padding): the bi-level modes look up soft assignments by these
    target: Tensor  # (B,)


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


def make_batch(samples: Samples, codes: Tensor, vocab: Vocab) -> Batch:
    """Tokens for a batch of samples from the code table (N, L') on the batch's device; no Python per sample."""
    history, target = samples.history, samples.target  # (B, H), (B,)
    b, h = history.shape
    present = history >= 0  # (B, H)
    tokens = vocab.tokens(codes[history.clamp_min(0)])  # (B, H, L')
    mask = present.unsqueeze(2).expand(b, h, vocab.levels)  # (B, H, L')
    input_ids = tokens.masked_fill(~mask, PAD).reshape(b, h * vocab.levels)  # (B, H*L')
    target_tokens = vocab.tokens(codes[target])  # (B, L')
    start = torch.full((b, 1), PAD, dtype=torch.long, device=target.device)
    eos = torch.full((b, 1), EOS, dtype=torch.long, device=target.device)
    return Batch(input_ids, mask.reshape(b, -1), torch.cat([start, target_tokens], dim=1),
                 torch.cat([target_tokens, eos], dim=1), history, target)
