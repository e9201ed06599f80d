"""The embedding cache: model outputs by the sha256 of the exact text, one Parquet file per model.

`bloger embed` after new items arrive (or texts change) encodes only the texts it has not seen. The cache
holds the model's raw output (before the optional L2 normalisation), keyed by model identity and
precision (fp32 / fp16), at ``WORKSPACE/cache/embed-SLUG-PRECISION.parquet`` with columns text_hash
string, embedding fixed_size_list<float32>[D]. It is not a catalog artifact: deleting it only costs
time. Writes are atomic (temporary file, then rename); an unreadable cache is logged and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bloger_cli.artifacts import temp_path_for

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 300.0  # during a long encode, save what is done this often (a kill loses at most this)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextCache:
    """Vectors by text hash; `add` new ones, `save` them (old entries are kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hashes: list[pa.Array] = []
        self._blocks: list[np.ndarray] = []  # each (M_i, D) float32
        self._unsaved = 0
        self._saved_at = time.monotonic()
        self._load()

    @property
    def dim(self) -> int | None:
        return self._blocks[0].shape[1] if self._blocks else None

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            table = pq.read_table(self.path)
        except (pa.ArrowInvalid, OSError) as exc:
            log.warning("ignoring unreadable embedding cache %s (%s); it will be rebuilt", self.path, exc)
            return
        emb = table.schema.field("embedding").type if table.column_names == ["text_hash", "embedding"] else None
        if emb is None or not pa.types.is_fixed_size_list(emb) or emb.value_type != pa.float32():
            log.warning("ignoring embedding cache %s with unexpected schema %s; it will be rebuilt", self.path,
                        table.schema.to_string(show_schema_metadata=False).replace("\n", ", "))
            return
        column = table.column("embedding").combine_chunks()
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)  # (M * D,)
        self._hashes.append(table.column("text_hash").combine_chunks())
        self._blocks.append(flat.astype(np.float32, copy=False).reshape(len(table), emb.list_size))  # (M, D)

    def _all(self) -> tuple[pa.Array, np.ndarray]:
        """(hashes (M,), vectors (M, D)) with the blocks merged into one."""
        if len(self._blocks) > 1:
            self._hashes = [pa.concat_arrays(self._hashes)]
            self._blocks = [np.concatenate(self._blocks)]
        if not self._blocks:
            return pa.array([], pa.string()), np.zeros((0, 0), np.float32)
        return self._hashes[0], self._blocks[0]

    def rows(self, hashes: list[str]) -> np.ndarray:
        """Row of each hash in the cache, -1 where absent: (N,) int64."""
        known, _ = self._all()
        found = pc.index_in(pa.array(hashes, pa.string()), value_set=known)
        return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def vectors(self, hashes: list[str]) -> np.ndarray:
        """The cached vectors of `hashes` (N, D); every hash must be present."""
        rows = self.rows(hashes)
        assert (rows >= 0).all(), "vectors() asked for texts that were never encoded"
        return self._all()[1][rows]

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        """New entries (vectors (b, D)); saved on the next `save` or `checkpoint`."""
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise AssertionError(f"cache {self.path} holds {self.dim}-d vectors, got {vectors.shape[1]}-d")
        self._hashes.append(pa.array(hashes, pa.string()))
        self._blocks.append(np.ascontiguousarray(vectors, dtype=np.float32))
        self._unsaved += len(hashes)

    def checkpoint(self) -> None:
        """Save if new entries have waited longer than CHECKPOINT_SECONDS (a killed run keeps its work)."""
        if self._unsaved and time.monotonic() - self._saved_at > CHECKPOINT_SECONDS:
            self.save()

    def save(self) -> None:
        """Rewrite the cache file atomically (temporary file beside it, then rename)."""
        if not self._unsaved:
            return
        hashes, vectors = self._all()
        dim = vectors.shape[1]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(self.path)
        try:
            pq.write_table(pa.table({"text_hash": hashes, "embedding": embedding}), tmp, compression="zstd")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("embedding cache %s: %d texts (%d new)", self.path, len(hashes), self._unsaved)
        self._unsaved = 0
        self._saved_at = time.monotonic()
