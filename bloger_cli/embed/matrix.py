"""Precomputed embeddings (`embed --from-file`): a .npy matrix or a .parquet table, checked against the items.

- ``.npy``: a 2-D numeric matrix, one row per item in item_id order (row i is item i).
- ``.parquet``: an ``item_id`` (or ``item_key``) column and an ``embedding`` column (a list of numbers;
  any other name works when it is the only list column), one row per item in any order.

Every item of items.parquet needs exactly one row, every row the same dimension, every value finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bloger_cli.errors import ConfigError, DataError

SUFFIXES = (".npy", ".parquet")
_NPY_HINT = "a .npy file needs one row per item of items.parquet, in item_id order (row i = item_id i)"
_PARQUET_HINT = "a .parquet file needs one row per item: item_id (or item_key) and embedding (a list of floats)"


def check_path(path: Path) -> Path:
    """The absolute path of an existing .npy / .parquet file (checked before the stage starts)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"from_file {path} does not exist", hint="give --from-file an existing .npy or .parquet file")
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"from_file {path}: unknown format {path.suffix or '(no extension)'!r}",
                          hint="give a .npy matrix or a .parquet table with item_id and embedding columns")
    return path


def load_matrix(path: Path, item_ids: np.ndarray, item_keys: list[str]) -> np.ndarray:
    """The file's vectors in the order of `item_ids` (sorted): (N, D) float32."""
    if path.suffix.lower() == ".npy":
        vectors = _read_npy(path, len(item_ids))
        check_finite(path, vectors, item_ids)
        return vectors
    ids, vectors = _read_parquet(path, item_keys)
    check_finite(path, vectors, ids)
    _check_ids(path, ids, item_ids)
    return vectors[np.argsort(ids, kind="stable")]


def first_nonfinite(vectors: np.ndarray) -> tuple[int, float, int] | None:
    """(first bad row, its first bad value, number of bad rows) for NaN / inf, else None."""
    bad = ~np.isfinite(vectors).all(axis=1)  # (N,)
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    return row, float(vectors[row][~np.isfinite(vectors[row])][0]), int(bad.sum())


def check_finite(path: Path, vectors: np.ndarray, ids: np.ndarray) -> None:
    found = first_nonfinite(vectors)
    if found is not None:
        row, value, count = found
        raise DataError(f"{path}: row {row} (item_id {int(ids[row])}) has a non-finite value ({value}); "
                        f"{count:,} of {len(vectors):,} rows have NaN or inf values",
                        hint="every embedding must be finite: fix those rows and run again")


def _read_npy(path: Path, n_items: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # pickled object arrays, truncated or foreign files
        raise DataError(f"{path}: not a readable .npy matrix ({exc})", hint=_NPY_HINT) from None
    if array.ndim != 2 or array.shape[1] == 0:
        raise DataError(f"{path}: expected a 2-D matrix (items x dimension), found shape {array.shape}",
                        hint=_NPY_HINT)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{path}: expected numbers, found dtype {array.dtype}", hint=_NPY_HINT)
    if array.shape[0] != n_items:
        raise DataError(f"{path}: {array.shape[0]:,} rows but items.parquet has {n_items:,} items", hint=_NPY_HINT)
    return np.asarray(array, dtype=np.float32)  # (N, D)


def _read_parquet(path: Path, item_keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(item ids (N,) int64, vectors (N, D) float32) in file order."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})", hint=_PARQUET_HINT) from None
    ids = _parquet_ids(path, table, item_keys)
    column = _embedding_column(path, table)
    values = table.column(column).combine_chunks()
    if values.null_count:
        row = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{path}: row {row} (item_id {ids[row]}) has no {column} (null)", hint=_PARQUET_HINT)
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)  # (N,)
    dim = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and (lengths != dim).any():
        row = int(np.argmax(lengths != dim))
        raise DataError(f"{path}: row {row} (item_id {ids[row]}) has {lengths[row]} values in {column}, "
                        f"row 0 has {dim}; every embedding needs the same dimension", hint=_PARQUET_HINT)
    flat = pc.list_flatten(values).to_numpy(zero_copy_only=False)  # (N * D,), null values -> NaN
    return ids, flat.astype(np.float32).reshape(len(ids), dim)


def _parquet_ids(path: Path, table: pa.Table, item_keys: list[str]) -> np.ndarray:
    """item_id values, or item_key values mapped to item ids: (N,) int64."""
    if "item_id" in table.column_names:
        column = table.column("item_id")
        if not pa.types.is_integer(column.type):
            raise DataError(f"{path}: item_id has type {column.type}, expected integers", hint=_PARQUET_HINT)
        if column.null_count:
            raise DataError(f"{path}: item_id has {column.null_count:,} null values", hint=_PARQUET_HINT)
        return column.to_numpy().astype(np.int64)
    if "item_key" not in table.column_names:
        raise DataError(f"{path}: no item_id or item_key column; columns are {', '.join(table.column_names)}",
                        hint=_PARQUET_HINT)
    index = {key: i for i, key in enumerate(item_keys)}
    keys = table.column("item_key").cast(pa.string()).to_pylist()
    unknown = [k for k in keys if k not in index]
    if unknown:
        raise DataError(f"{path}: {len(unknown):,} item_key values are not in items.parquet "
                        f"(e.g. {', '.join(map(str, unknown[:5]))})", hint=_PARQUET_HINT)
    return np.array([index[k] for k in keys], dtype=np.int64)


def _embedding_column(path: Path, table: pa.Table) -> str:
    lists = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
             or pa.types.is_fixed_size_list(f.type)]
    name = "embedding" if "embedding" in lists else (lists[0] if len(lists) == 1 else None)
    if name is None:
        raise DataError(f"{path}: no embedding column (a list of numbers); columns are "
                        f"{', '.join(table.column_names)}", hint=_PARQUET_HINT)
    value_type = table.schema.field(name).type.value_type
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise DataError(f"{path}: column {name} holds {value_type}, expected numbers", hint=_PARQUET_HINT)
    return name


def _check_ids(path: Path, ids: np.ndarray, item_ids: np.ndarray) -> None:
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = int(values[np.argmax(counts > 1)])
        raise DataError(f"{path}: item_id {dup} appears {int(counts.max())} times; "
                        f"{int((counts > 1).sum()):,} item ids repeat", hint=_PARQUET_HINT)
    missing = np.setdiff1d(item_ids, values)
    unknown = np.setdiff1d(values, item_ids)
    if missing.size or unknown.size:
        raise DataError(
            f"{path}: {len(ids):,} rows but items.parquet has {len(item_ids):,} items ({missing.size:,} missing, "
            f"e.g. {_examples(missing)}; {unknown.size:,} unknown, e.g. {_examples(unknown)})", hint=_PARQUET_HINT)


def _examples(values: np.ndarray) -> str:
    return ", ".join(str(int(v)) for v in values[:5]) or "none"
