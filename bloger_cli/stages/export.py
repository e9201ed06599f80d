"""`bloger export-ids`: every item's raw key, dense id and semantic ID to Parquet, CSV or JSONL.

The export has one row per item with a semantic ID, in item_id order:

    item_key     the raw id from the source (string)
    item_id      the dense id (int32)
    semantic_id  the codes joined by '-', e.g. "12-200-3-0": stable, and easy to join on in any tool
    codes        list<int16> in Parquet and JSONL; in CSV one int column per level, code_1 .. code_n

`--codebooks FILE` also writes the tokenizer's codebooks, one row per (level, code): level 1..L
(level l holds the vectors of code_l; a disambiguation code has no codebook), code 0..K-1, and vector
list<float32> in Parquet and JSONL, or one float column per dimension, vector_1 .. vector_d, in CSV.
`--compare OLD` reads an earlier export (any of the three formats) and counts, by item_key, the items in
both, those whose semantic_id changed, and the items added and removed.

An export is a user-chosen file, not a workspace artifact: each file goes to a temporary file beside it
and all are renamed into place only once every file is written, so a failed export leaves existing
files as they were. Missing parent directories of the outputs are created.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bloger_cli import __version__
from bloger_cli.artifacts import SPECS, ArtifactInfo, load_torch, temp_path_for
from bloger_cli.config import ExportConfig
from bloger_cli.errors import ArtifactError, ConfigError, DataError
from bloger_cli.serving.output import SUFFIXES
from bloger_cli.workspace import (
    StageContext,
    StageResult,
    Workspace,
    raw_fingerprint,
    run_stage,
)

log = logging.getLogger(__name__)

# --from -> (semantic IDs kind, tokenizer kind). The training stage will register the "train" kinds in
# artifacts.SPECS with the schemas of semantic_ids / tokenizer; until it does, --from train is refused.
SOURCES = {"tokenize": ("semantic_ids", "tokenizer"), "train": ("trained_semantic_ids", "trained_tokenizer")}
CSV_SPREAD = {"codes": "code", "vector": "vector"}  # list column -> CSV column prefix (code_1, code_2, ...)
EXPORT_COLUMNS = ("item_key", "semantic_id")  # what --compare needs from an earlier export


@dataclass(frozen=True)
class _Plan:
    """What run() checked before taking the lock: formats and the input artifacts."""

    out_format: str
    codebooks_format: str | None
    compare_format: str | None
    items: ArtifactInfo
    ids: ArtifactInfo
    tokenizer: ArtifactInfo | None


class _File(NamedTuple):
    option: str  # the CLI option that named it, for error messages
    path: Path
    format: str
    table: pa.Table


def run(cfg: ExportConfig, ws: Workspace, *, force: bool = True, lock_timeout: float = 60.0) -> StageResult:
    """Export the workspace's semantic IDs (and optionally codebooks and a comparison); always runs."""
    plan = _plan(cfg, ws)
    inputs = {f"artifact:{info.kind}": info.content_hash for info in (plan.items, plan.ids, plan.tokenizer) if info}
    if cfg.compare is not None:
        inputs[f"file:{cfg.compare.resolve()}"] = raw_fingerprint(cfg.compare)
    return run_stage(ws, "export-ids", cfg, inputs, lambda ctx: _export(ctx, cfg, plan),
                     force=force, lock_timeout=lock_timeout)


def resolve_format(path: Path, given: str | None, option: str) -> str:
    """The explicit --format, else the format the file's suffix names; a ConfigError when neither says."""
    suffix = path.suffix.lower()
    if given is not None:
        if SUFFIXES.get(suffix, given) != given:
            log.warning("%s %s: writing %s as --format says, although the suffix says %s",
                        option, path, given, SUFFIXES[suffix])
        return given
    if suffix not in SUFFIXES:
        said = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise ConfigError(f"{option} {path}: cannot tell the format from {said}",
                          hint="give --format parquet|csv|jsonl, or end the name in .parquet, .csv or .jsonl")
    return SUFFIXES[suffix]


def _plan(cfg: ExportConfig, ws: Workspace) -> _Plan:
    out_format = resolve_format(cfg.out, cfg.format, "--out")
    codebooks_format = resolve_format(cfg.codebooks, cfg.format, "--codebooks") if cfg.codebooks else None
    for option, path in (("--out", cfg.out), ("--codebooks", cfg.codebooks)):
        if path is not None and path.is_dir():
            raise ConfigError(f"{option} {path} is a directory", hint=f"give a file name, e.g. {path / 'ids.parquet'}")
    if cfg.codebooks is not None and cfg.codebooks.resolve() == cfg.out.resolve():
        raise ConfigError(f"--out and --codebooks are the same file ({cfg.out})",
                          hint="give --codebooks a file name of its own")
    compare_format = _compare_format(cfg.compare) if cfg.compare is not None else None
    ids_kind, tokenizer_kind = SOURCES[cfg.from_]
    if cfg.from_ == "train" and (ids_kind not in SPECS or not ws.path(ids_kind).is_file()):
        raise ConfigError(f"--from {cfg.from_}: no trained model in {ws.root} yet",
                          hint="run `bloger train-bilevel` first")
    infos = ws.inputs("items", ids_kind, *((tokenizer_kind,) if cfg.codebooks else ()))
    tokenizer = infos.get(tokenizer_kind)
    if tokenizer is not None and tokenizer.config_hash != infos[ids_kind].config_hash:
        raise ArtifactError(f"{tokenizer.path} and {infos[ids_kind].path} come from different "
                            f"`bloger {SPECS[ids_kind].producer}` runs",
                            hint=f"re-run `bloger {SPECS[ids_kind].producer} --force`")
    return _Plan(out_format, codebooks_format, compare_format, infos["items"], infos[ids_kind], tokenizer)


def _compare_format(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"--compare {path}: file not found", hint="give an earlier `bloger export-ids` output")
    if path.suffix.lower() not in SUFFIXES:
        said = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise ConfigError(f"--compare {path}: cannot tell the format from {said}",
                          hint="--compare reads .parquet, .csv and .jsonl exports")
    return SUFFIXES[path.suffix.lower()]


def _export(ctx: StageContext, cfg: ExportConfig, plan: _Plan) -> dict[str, Any]:
    with duckdb.connect() as con:
        table, notes = id_table(con, plan.items, plan.ids)
        result: dict[str, Any] = {
            "out": str(cfg.out), "format": plan.out_format, "rows": table.num_rows,
            "id_length": table.schema.field("codes").type.list_size,
            "codebooks": str(cfg.codebooks) if cfg.codebooks else None,
        }
        if cfg.compare is not None:
            assert plan.compare_format is not None  # _plan resolves it whenever --compare is given
            result.update(compare(con, table, cfg.compare, plan.compare_format))
        files = [_File("--out", cfg.out, plan.out_format, table)]
        if cfg.codebooks is not None:
            # _plan resolves both whenever --codebooks is given
            assert plan.tokenizer is not None and plan.codebooks_format is not None
            books = codebook_tensors(load_torch(plan.tokenizer.path, SPECS[plan.tokenizer.kind]), plan.tokenizer.path)
            files.append(_File("--codebooks", cfg.codebooks, plan.codebooks_format, codebook_table(books)))
        metadata = {"bloger.version": __version__, "bloger.run_id": ctx.run_id,
                    "bloger.parents": json.dumps(ctx.parents, sort_keys=True)}
        write_files(con, files, metadata)
    log.info("exported %d semantic IDs to %s", table.num_rows, cfg.out)
    return {**result, "notes": notes}


# ------------------------------------------------------------------------------------------ the ID table


def id_table(con: duckdb.DuckDBPyConnection, items: ArtifactInfo, ids: ArtifactInfo) -> tuple[pa.Table, list[str]]:
    """item_key, item_id, semantic_id, codes (fixed_size_list<int16>[n]) in item_id order, and notes."""
    width = pq.read_schema(ids.path).field("codes").type.list_size
    fix = f"re-run `bloger {SPECS[ids.kind].producer} --force`"
    [(n, distinct, matched, gaps)] = con.sql(f"""
        SELECT count(*), count(DISTINCT s.item_id), count(i.item_id),
               count(*) FILTER (WHERE s.codes IS NULL OR list_aggregate(s.codes, 'count') < {width})
        FROM read_parquet({_sql(ids.path)}) s
        LEFT JOIN (SELECT item_id FROM read_parquet({_sql(items.path)})) i ON i.item_id = s.item_id
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
        FROM read_parquet({_sql(ids.path)}) s JOIN read_parquet({_sql(items.path)}) i ON i.item_id = s.item_id
        ORDER BY s.item_id
    """).to_arrow_table()
    schema = pa.schema([("item_key", pa.string()), ("item_id", pa.int32()), ("semantic_id", pa.string()),
                        ("codes", pa.list_(pa.int16(), width))])
    notes = []
    if items.rows > n:
        notes.append(f"{items.rows - n} of {items.rows} items have no semantic ID and are not exported")
    return table.cast(schema), notes


def _sql(value: Any) -> str:
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


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
    source = _READERS[fmt].format(_sql(path))
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


# --------------------------------------------------------------------------------------------- writing


def write_files(con: duckdb.DuckDBPyConnection, files: list[_File], metadata: dict[str, str]) -> None:
    """Write every file to a temporary path beside it, then rename them all into place."""
    temps: list[Path] = []
    try:
        for file in files:
            _make_parent(file)
            temps.append(temp_path_for(file.path))
            WRITERS[file.format](con, file.table, temps[-1], metadata)
        for file, tmp in zip(files, temps):
            os.replace(tmp, file.path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _make_parent(file: _File) -> None:
    try:
        file.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{file.option} {file.path}: cannot create directory {file.path.parent} "
                          f"({exc.strerror})") from None


def _variable_lists(table: pa.Table) -> pa.Table:
    """fixed_size_list columns as plain lists (list<int16>, list<float32>): what most readers expect."""
    fields = [pa.field(f.name, pa.list_(f.type.value_type)) if pa.types.is_fixed_size_list(f.type) else f
              for f in table.schema]
    return table.cast(pa.schema(fields))


def _write_parquet(con: duckdb.DuckDBPyConnection, table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    table = _variable_lists(table).replace_schema_metadata(metadata)
    pq.write_table(table, path, compression="zstd")


def _write_csv(con: duckdb.DuckDBPyConnection, table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    """List columns spread into one column per position: codes -> code_1..code_n, vector -> vector_1..."""
    for name, prefix in CSV_SPREAD.items():
        if name in table.column_names:
            index, column = table.column_names.index(name), table.column(name)
            table = table.remove_column(index)
            for i in reversed(range(column.type.list_size)):
                table = table.add_column(index, f"{prefix}_{i + 1}", pc.list_element(column, i))
    pacsv.write_csv(table, path)


def _write_jsonl(con: duckdb.DuckDBPyConnection, table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    """One JSON object per line (DuckDB COPY). Float lists are printed at float32 precision (0.1, not
    0.10000000149011612): the shortest text that reads back to the same float32."""
    table = _variable_lists(table)
    select = ", ".join(
        f"('[' || array_to_string({f.name}, ',') || ']')::JSON AS {f.name}"
        if pa.types.is_list(f.type) and pa.types.is_float32(f.type.value_type) else f.name
        for f in table.schema)
    con.register("export_rows", table)
    try:
        con.execute(f"COPY (SELECT {select} FROM export_rows) TO {_sql(path)} (FORMAT json)")
    finally:
        con.unregister("export_rows")


WRITERS: dict[str, Callable[[duckdb.DuckDBPyConnection, pa.Table, Path, dict[str, str]], None]] = {
    "parquet": _write_parquet, "csv": _write_csv, "jsonl": _write_jsonl,
}
