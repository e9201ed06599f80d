"""Semantic IDs as users take them away (`bloger export-ids`): the ID table (item key, item id,
semantic_id text, codes), the tokenizer's codebooks as a table, and the comparison with an earlier
export (how many items changed ID)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bloger_cli.artifacts import SPECS, ArtifactInfo, sql_literal
from bloger_cli.errors import ArtifactError, DataError

log = logging.getLogger(__name__)

EXPORT_COLUMNS = ("item_key", "semantic_id")  # what --compare needs from an earlier export


def id_table(con: duckdb.DuckDBPyConnection, items: ArtifactInfo, ids: ArtifactInfo) -> tuple[pa.Table, list[str]]:
    """item_key, item_id, semantic_id, codes (fixed_size_list<int16>[n]) in item_id order, and notes."""
    width = pq.read_schema(ids.path).field("codes").type.list_size
    fix = f"re-run `bloger {SPECS[ids.kind].producer} --force`"
    [(n, distinct, matched, gaps)] = con.sql(f"""
        SELECT count(*), count(DISTINCT s.item_id), count(i.item_id),
               count(*) FILTER (WHERE s.codes IS NULL OR list_aggregate(s.codes, 'count') < {width})
        FROM read_parquet({sql_literal(ids.path)}) s
        LEFT JOIN (SELECT item_id FROM read_parquet({sql_literal(items.path)})) i ON i.item_id = s.item_id
    """).fetchall()
    if n == 0:
        raise ArtifactError(f"{ids.path} has no rows", hint=fix)
    if distinct < n:
        raise ArtifactError(f"{ids.path}: {n - distinct} duplicate item_id(s)", hint=fix)
    if matched < n:
        raise ArtifactError(f"{ids.path}: {n - matched} item_id(s) not in {items.path}", hint=fix)
    if gaps:
        raise ArtifactError(f"{ids.path}: {gaps} row(s) with a missing code", hint=fix)
    table = con.sql(f"""
        SELECT i.item_key, s.item_id, array_to_string(s.codes, '-') AS semantic_id, s.codes
        FROM read_parquet({sql_literal(ids.path)}) s
        JOIN read_parquet({sql_literal(items.path)}) i ON i.item_id = s.item_id
        ORDER BY s.item_id
    """).to_arrow_table()
    schema = pa.schema([("item_key", pa.string()), ("item_id", pa.int32()), ("semantic_id", pa.string()),
                        ("codes", pa.list_(pa.int16(), width))])
    notes = []
    if items.rows > n:
        notes.append(f"{items.rows - n} of {items.rows} items have no semantic ID and are not exported")
    return table.cast(schema), notes


# ------------------------------------------------------------------------------------------- codebooks

# The tokenizer's state_dict names: RQVAE keeps `quantizer.codebooks.{l}` (an nn.ParameterList, l from 0);
# `codebooks.{l}.weight` (nn.Embedding per level) is accepted too.
_CODEBOOK_KEY = re.compile(r"(?:^|\.)codebooks\.(\d+)(?:\.weight)?$")


def codebook_tensors(ckpt: dict[str, Any], path: Path) -> list[np.ndarray]:
    """The codebooks of a tokenizer checkpoint, level by level, as (K, d) float32 arrays."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} has no state_dict", hint="re-run `bloger tokenize --force`")
    found: dict[int, tuple[str, Any]] = {}
    for key, value in state.items():
        match = _CODEBOOK_KEY.search(key)
        if match is None:
            continue
        level = int(match.group(1))
        if level in found:
            raise ArtifactError(f"{path}: two codebooks for level {level + 1} ({found[level][0]}, {key})")
        found[level] = (key, value)
    if not found or sorted(found) != list(range(len(found))):
        raise ArtifactError(f"{path}: no codebooks for levels 1..L in the state_dict (looked for keys "
                            f"'codebooks.<level>' or '<prefix>.codebooks.<level>[.weight]', found "
                            f"{', '.join(repr(k) for k, _ in found.values()) or 'none'})",
                            hint="re-run `bloger tokenize --force`")
    books = [found[level][1].detach().cpu().float().numpy() for level in range(len(found))]
    for level, book in enumerate(books, start=1):
        if book.ndim != 2 or book.shape[1] != books[0].shape[1]:
            raise ArtifactError(f"{path}: codebook of level {level} has shape {book.shape}, expected (K, "
                                f"{books[0].shape[-1]})")
        if not np.isfinite(book).all():
            raise ArtifactError(f"{path}: codebook of level {level} holds NaN or infinite values",
                                hint="re-run `bloger tokenize --force`")
    return books


def codebook_table(books: list[np.ndarray]) -> pa.Table:
    """level (1..L), code (0..K-1), vector fixed_size_list<float32>[d]: one row per code of each level."""
    dim = books[0].shape[1]
    vectors = np.concatenate(books).astype(np.float32)  # (sum K, d)
    return pa.table({
        "level": np.concatenate([np.full(len(b), level, np.int16) for level, b in enumerate(books, start=1)]),
        "code": np.concatenate([np.arange(len(b), dtype=np.int16) for b in books]),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
    })


# --------------------------------------------------------------------------------------------- compare


def compare(con: duckdb.DuckDBPyConnection, new: pa.Table, path: Path, fmt: str) -> dict[str, Any]:
    """Counts by item_key against an earlier export: in both, semantic_id changed, added, removed."""
    _read_export(con, path, fmt)  # -> table old_ids(item_key, semantic_id)
    con.register("new_ids", new.select(list(EXPORT_COLUMNS)))
    [(common, changed, added, removed)] = con.sql("""
        SELECT count(*) FILTER (WHERE n.item_key IS NOT NULL AND o.item_key IS NOT NULL),
               count(*) FILTER (WHERE n.item_key IS NOT NULL AND o.item_key IS NOT NULL
                                AND n.semantic_id IS DISTINCT FROM o.semantic_id),
               count(*) FILTER (WHERE o.item_key IS NULL),
               count(*) FILTER (WHERE n.item_key IS NULL)
        FROM new_ids n FULL OUTER JOIN old_ids o ON n.item_key = o.item_key
    """).fetchall()
    con.unregister("new_ids")
    log.info("compared with %s: %d of %d items changed ID", path, changed, common)
    return {"compare_common": common, "compare_changed": changed,
            "compare_changed_share": changed / common if common else 0.0,
            "compare_added": added, "compare_removed": removed}


_READERS = {
    "parquet": "read_parquet({})",
    "csv": "read_csv({}, header = true, all_varchar = true)",  # keys such as "007" stay text
    "jsonl": "read_json({}, format = 'newline_delimited')",
}


def _read_export(con: duckdb.DuckDBPyConnection, path: Path, fmt: str) -> None:
    """Load an earlier export's item_key and semantic_id (as text) into the temporary table old_ids."""
    source = _READERS[fmt].format(sql_literal(path))
    try:
        columns = con.sql(f"SELECT * FROM {source} LIMIT 0").columns
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--compare {path}: not a readable {fmt} file ({first})") from None
    for column in EXPORT_COLUMNS:
        if column not in columns:
            raise DataError(f"--compare {path}: missing column {column!r} (columns are {', '.join(columns)})",
                            hint="give a file written by `bloger export-ids`")
    con.execute(f"CREATE OR REPLACE TEMP TABLE old_ids AS SELECT CAST(item_key AS VARCHAR) AS item_key, "
                f"CAST(semantic_id AS VARCHAR) AS semantic_id FROM {source}")
    [(nulls, dup)] = con.sql("SELECT count(*) FILTER (WHERE item_key IS NULL), "
                         "(SELECT item_key FROM old_ids GROUP BY item_key HAVING count(*) > 1 LIMIT 1) "
                         "FROM old_ids").fetchall()
    if nulls:
        raise DataError(f"--compare {path}: {nulls} row(s) without an item_key")
    if dup is not None:
        raise DataError(f"--compare {path}: item_key {dup!r} appears more than once")
