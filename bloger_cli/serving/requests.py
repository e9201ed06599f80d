"""Who to recommend for, and from which history: workspace users (all, or `--users FILE`) or new histories
(`--histories FILE`), as one `Requests` of padded item-id tensors.

A workspace user's history is their whole sequence, the serving case (the next item after their last),
capped at the last `max_history` items as in training; `--as-of test|valid` cuts it where evaluation
does (the same SQL, `data/splits.py`). Seen items are everything before the cut, not only the capped
history. A new history's item keys are the raw keys of the user's data; unknown ones are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from bloger_cli.artifacts import SPECS, read_table
from bloger_cli.data.splits import split_query
from bloger_cli.errors import ConfigError, DataError
from bloger_cli.workspace import Workspace

log = logging.getLogger(__name__)

SHOWN = 10  # unknown keys named in a message
HISTORY_COLUMNS = ("user_key", "items")


@dataclass
class Requests:
    """One row per user to recommend for."""

    user_keys: pa.Array  # (U,) string
    history: Tensor  # (U, H) int64 item ids, left-aligned, -1 padded (what the model reads)
    seen: pa.ListArray  # (U,) list<int64>: items to exclude with --exclude-seen
    notes: dict = field(default_factory=dict)  # counts for the summary (unknown users, items, ...)

    def __len__(self) -> int:
        return len(self.user_keys)


def workspace_users(ws: Workspace, users_file: Path | None, as_of: Literal["valid", "test"] | None,
                    max_history: int) -> Requests:
    """Every user of the workspace, or those `users_file` names (in its order), with their histories."""
    sequences = read_table(ws.path("sequences"), SPECS["sequences"], columns=["user_id", "items"])
    users = read_table(ws.path("users"), SPECS["users"], columns=["user_id", "user_key"])
    with duckdb.connect() as con:
        con.register("sequences", sequences)
        con.register("users", users)
        if as_of is None:  # the serving case: the next item after the last
            cut = (f"SELECT user_id, list_slice(items, greatest(1, len(items) - {int(max_history)} + 1), "
                   f"len(items)) AS history, items AS seen FROM sequences")
        else:  # exactly evaluate's samples, and every item before the target as seen
            drop = 1 if as_of == "test" else 2
            cut = (f"SELECT q.user_id, q.history, list_slice(s.items, 1, len(s.items) - {drop}) AS seen "
                   f"FROM ({split_query('sequences', as_of, max_history)}) q JOIN sequences s USING (user_id)")
        if users_file is None:
            query = f"SELECT u.user_key, c.history, c.seen FROM ({cut}) c JOIN users u USING (user_id) " \
                    f"ORDER BY c.user_id"
            notes: dict = {}
        else:
            keys = read_user_keys(users_file)
            con.register("wanted", pa.table({"user_key": keys, "pos": np.arange(len(keys))}))
            notes = _unknown_users(con, users_file, ws)
            query = (f"SELECT w.user_key, c.history, c.seen FROM wanted w JOIN users u USING (user_key) "
                     f"JOIN ({cut}) c USING (user_id) ORDER BY w.pos")
        table = con.sql(query).to_arrow_table()
        wanted = len(users) if users_file is None else notes["requested_users"] - notes["unknown_users"]
    if as_of is not None and table.num_rows < wanted:
        log.warning("%d user(s) have too few items for a %s cut (they need at least 3) and are skipped",
                    wanted - table.num_rows, as_of)
        notes["skipped_users"] = wanted - table.num_rows
    return Requests(table.column("user_key").combine_chunks(),
                    _pad(table.column("history").combine_chunks(), max_history),
                    table.column("seen").combine_chunks().cast(pa.list_(pa.int64())), notes)


def read_user_keys(path: Path) -> pa.Array:
    """User keys, one a line, each once in the order of first appearance (blank lines ignored, surrounding
    spaces stripped)."""
    if not path.is_file():
        raise DataError(f"--users {path}: file not found", hint="give a file of user keys, one a line")
    keys = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                              if line.strip()))
    if not keys:
        raise DataError(f"--users {path}: no user keys in it", hint="give a file of user keys, one a line")
    return pa.array(keys, pa.string())


def _unknown_users(con: duckdb.DuckDBPyConnection, path: Path, ws: Workspace) -> dict:
    [(requested, unknown, shown)] = con.sql(
        f"SELECT count(*), count(*) FILTER (WHERE u.user_key IS NULL), "
        f"(list(w.user_key ORDER BY w.pos) FILTER (WHERE u.user_key IS NULL))[1:{SHOWN}] "
        f"FROM wanted w LEFT JOIN users u USING (user_key)").fetchall()
    named = ", ".join(shown or [])
    if unknown == requested:
        raise DataError(f"--users {path}: none of its {requested} user key(s) is a user of {ws.root} "
                        f"({named}{', ...' if unknown > SHOWN else ''})",
                        hint="give keys as the users file of `bloger prepare` has them")
    if unknown:
        log.warning("--users %s: %d of %d user keys are not users of %s and are skipped: %s%s", path, unknown,
                    requested, ws.root, named, ", ..." if unknown > SHOWN else "")
    return {"requested_users": requested, "unknown_users": unknown, "unknown_user_keys": list(shown or [])}


def new_histories(path: Path, item_keys: pa.Array, max_history: int) -> Requests:
    """`--histories FILE` (Parquet or JSONL: user_key, items list of item keys) mapped to item ids."""
    table = _read_histories(path)
    items = table.column("items").combine_chunks()
    flat = pc.cast(items.flatten(), pa.string())  # raw keys; numbers in JSONL become their text
    ids = pc.index_in(flat, value_set=item_keys)  # (E,) item id, null when unknown
    known = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(items)), np.diff(items.offsets.to_numpy()))  # (E,) row of each entry
    kept = ids.filter(pc.is_valid(ids)).cast(pa.int64())
    counts = np.bincount(owner[known], minlength=len(items))
    seen = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()), kept)
    unknown = int((~known).sum())
    if unknown:
        log.warning("--histories %s: %d of %d item keys are not items of the model and are dropped",
                    path, unknown, len(flat))
    empty = int((counts == 0).sum())
    if empty:
        log.warning("--histories %s: %d of %d histories have no known item: they get the most popular items",
                    path, empty, len(items))
    last = _last(seen, max_history)
    notes = {"unknown_items": unknown, "history_items": len(flat), "popularity_users": empty}
    return Requests(pc.cast(table.column("user_key").combine_chunks(), pa.string()), last, seen, notes)


_READERS = {".parquet": "read_parquet({})", ".pq": "read_parquet({})",
            ".jsonl": "read_json({}, format = 'newline_delimited')",
            ".ndjson": "read_json({}, format = 'newline_delimited')"}


def _read_histories(path: Path) -> pa.Table:
    """user_key string, items list<string> from Parquet or JSONL; keys of any type (numbers in JSON, a
    mix of numbers and strings) become their text."""
    if not path.is_file():
        raise DataError(f"--histories {path}: file not found",
                        hint="give a Parquet or JSONL file of user_key, items: [item_key, ...]")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ConfigError(f"--histories {path}: cannot tell the format from suffix {path.suffix!r}",
                          hint="end the name in .parquet or .jsonl")
    with duckdb.connect() as con:
        try:
            source = con.sql(f"SELECT * FROM {_READERS[suffix].format(_sql(path))}")
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"--histories {path}: not a readable {suffix.lstrip('.')} file ({first})") from None
        types = dict(zip(source.columns, (str(t) for t in source.types)))
        missing = [c for c in HISTORY_COLUMNS if c not in types]
        if missing:
            raise DataError(f"--histories {path}: missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))} (columns are {', '.join(types) or 'none'})",
                            hint="give user_key and items: [item_key, ...] per row")
        if not types["items"].endswith("[]"):
            raise DataError(f"--histories {path}: column 'items' has type {types['items']}, expected a list of "
                            f"item keys")
        text = "json_extract_string(x, '$')" if types["items"] == "JSON[]" else "CAST(x AS VARCHAR)"
        key = "json_extract_string(user_key, '$')" if types["user_key"] == "JSON" else "CAST(user_key AS VARCHAR)"
        table = con.sql(f"SELECT {key} AS user_key, list_transform(items, lambda x: {text}) AS items "
                        f"FROM source").to_arrow_table()
    nulls = table.column("user_key").null_count
    if nulls:
        raise DataError(f"--histories {path}: {nulls} row(s) without a user_key")
    return table


def _sql(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _last(lists: pa.ListArray, width: int) -> Tensor:
    """The last `width` items of each list as (U, width) int64, left-aligned, -1 padded."""
    offsets = lists.offsets.to_numpy().astype(np.int64)
    starts = np.maximum(offsets[:-1], offsets[1:] - width)
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = offsets[1:] - starts
    out = np.full((len(lists), width), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = values[np.repeat(starts, lengths) + cols]
    return torch.from_numpy(out)


def _pad(lists: pa.ListArray, width: int) -> Tensor:
    """Histories already capped at `width` items -> (U, width) int64, -1 padded."""
    return _last(lists.cast(pa.list_(pa.int64())), width)
