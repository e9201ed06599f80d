"""Source importers: each loads raw interactions (and item text) into two DuckDB tables.

Contract, whatever the source:
- ``raw(user_key VARCHAR, item_key VARCHAR, ts BIGINT, rating DOUBLE, ord BIGINT)``: one row per raw
  interaction; ``ord`` is the input order (the stable tie-break for equal timestamps); ``ts`` is NULL
  when the source has no time (then ``ord`` gives the chronology).
- ``raw_items(item_key VARCHAR, <text fields> VARCHAR...)``: item metadata, possibly empty.

Importers validate files before anything is written (missing, empty, unparseable, missing columns)
and raise `DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bloger_cli.config import PrepareConfig
from bloger_cli.errors import DataError

log = logging.getLogger(__name__)

RESERVED_COLUMNS = {"item_id", "item_key", "n_interactions"}


@dataclass
class SourceFiles:
    """The files a source reads, resolved (and checked to exist) before any work starts."""

    interactions: list[Path]
    items: Path | None = None

    def all(self) -> list[Path]:
        return [*self.interactions, *([self.items] if self.items else [])]


@dataclass
class SourceInfo:
    """What an importer found: which optional columns exist, and notes for the summary."""

    has_time: bool
    has_rating: bool
    text_fields: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def input_path(cfg: PrepareConfig) -> Path:
    """`--input`: PrepareConfig requires it for every source but synthetic, which reads no files."""
    assert cfg.input is not None, f"source {cfg.source!r} without an input passed validation"
    return cfg.input


def one_row(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one (an aggregate without GROUP BY)."""
    row = con.execute(sql).fetchone()
    assert row is not None, f"no row from {sql}"
    return row


def require_file(path: Path, what: str) -> Path:
    """A clear error for a missing or empty input file."""
    if not path.exists():
        raise DataError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{what} path {path} is a directory, expected a file")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file {path} is empty")
    return path


def find_one(directory: Path, patterns: list[str], what: str) -> Path:
    """The single file in `directory` matching one of `patterns` (clear error for none or several)."""
    for pattern in patterns:
        hits = sorted(directory.glob(pattern))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{directory} holds several {what} files ({', '.join(h.name for h in hits)})",
                            hint="give the file itself with --input")
    raise DataError(f"no {what} file ({' or '.join(patterns)}) in {directory}")


def load_json(path: Path) -> Any:
    """Parse a JSON document with a one-line error for truncated or invalid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def text_value(value: Any) -> str | None:
    """A metadata value as text: lists joined with ', ', nested lists flattened, empty -> None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [text_value(v) for v in value]
        joined = ", ".join(p for p in parts if p)
        return joined or None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    text = str(value).strip()
    return text or None


def safe_field_name(name: str) -> str:
    """Text columns must not collide with the items artifact's own columns."""
    name = str(name).strip() or "field"
    return f"{name}_text" if name in RESERVED_COLUMNS else name


def register_items(con: duckdb.DuckDBPyConnection, records: dict[str, dict[str, Any]]) -> list[str]:
    """Build `raw_items` from {item_key: {field: value}} (one Python step per item, not per interaction)."""
    fields: dict[str, None] = {}
    for rec in records.values():
        if isinstance(rec, dict):
            fields.update(dict.fromkeys(rec))
    columns: dict[str, list[Any]] = {"item_key": [str(k) for k in records]}
    names = {f: safe_field_name(f) for f in fields}
    for f, col in names.items():
        columns[col] = [text_value(rec.get(f)) if isinstance(rec, dict) else None for rec in records.values()]
    con.register("raw_items_arrow", pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}))
    con.execute("CREATE OR REPLACE TABLE raw_items AS SELECT * FROM raw_items_arrow")
    con.unregister("raw_items_arrow")
    return list(names.values())


def empty_items(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE OR REPLACE TABLE raw_items (item_key VARCHAR)")


# ---------------------------------------------------------------------------------------------------
# letter: {"user": [item, ...]} in time order, optional {"item": {"title": ..., ...}}


def interactions_and_items(cfg: PrepareConfig, pattern: str, what: str,
                           beside: Callable[[Path], Path]) -> SourceFiles:
    """The interactions file (`--input`, or the one file matching `pattern` in that directory) and the
    item file (`--items`, else `beside(interactions)` when it exists), both checked."""
    path = input_path(cfg)
    if path.is_dir():
        path = find_one(path, [pattern], f"{what} ({pattern})")
    require_file(path, "interactions")
    items = cfg.items
    if items is None:
        guess = beside(path)
        items = guess if guess != path and guess.is_file() else None
    return SourceFiles([path], require_file(items, "item metadata") if items else None)


def letter_files(cfg: PrepareConfig) -> SourceFiles:
    return interactions_and_items(cfg, "*.inter.json", "LETTER interactions",
                                  lambda p: p.with_name(p.name.replace(".inter.json", ".item.json")))


def load_letter(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, files: SourceFiles) -> SourceInfo:
    path = files.interactions[0]
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{user: [item, ...]}}, found {type(data).__name__}")
    bad = next((k for k, v in data.items() if not isinstance(v, list)), None)
    if bad is not None:
        raise DataError(f"{path}: user {bad!r} maps to {type(data[bad]).__name__}, expected a list of item ids")
    try:
        lists = pa.array(list(data.values()))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: item ids must all be numbers or all strings ({exc})") from None
    if not pa.types.is_list(lists.type):  # every list empty
        lists = lists.cast(pa.list_(pa.string()))
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(lists).cast(pa.string())
    offsets = np.repeat(np.asarray(lists.offsets)[:-1], lengths)
    ordinal = np.arange(len(flat), dtype=np.int64)
    table = pa.table({
        "user_key": pa.array(np.repeat(np.array(list(data.keys()), dtype=object), lengths), pa.string()),
        "item_key": flat,
        "ts": pa.array(ordinal - offsets, pa.int64()),  # position in the user's list = its chronology
        "rating": pa.nulls(len(flat), pa.float64()),
        "ord": pa.array(ordinal),
    })
    con.register("raw_arrow", table)
    con.execute("CREATE OR REPLACE TABLE raw AS SELECT * FROM raw_arrow")
    con.unregister("raw_arrow")
    info = SourceInfo(has_time=False, has_rating=False)
    if files.items is not None:
        meta = load_json(files.items)
        if not isinstance(meta, dict):
            raise DataError(f"{files.items}: expected a JSON object {{item: {{field: value}}}}")
        info.text_fields = register_items(con, meta)
    else:
        empty_items(con)
        info.notes.append("no item metadata file: items have no text")
    return info


# ---------------------------------------------------------------------------------------------------
# Generic tables through DuckDB's readers (CSV/TSV/Parquet/JSONL, gzip included)

_TABLE_READERS = {
    ".csv": "read_csv({path}, header=true, sample_size=-1)",
    ".tsv": "read_csv({path}, header=true, delim='\t', sample_size=-1)",
    ".txt": "read_csv({path}, header=true, sample_size=-1)",
    ".parquet": "read_parquet({path})",
    ".jsonl": "read_json({path}, format='newline_delimited')",
    ".ndjson": "read_json({path}, format='newline_delimited')",
    ".json": "read_json({path}, format='auto')",
}


def table_reader(path: Path) -> str:
    """The DuckDB table function that reads `path`, chosen by extension (.gz is looked through)."""
    suffixes = [s for s in path.suffixes if s not in (".gz", ".zst")]
    ext = suffixes[-1].lower() if suffixes else ""
    if ext not in _TABLE_READERS:
        raise DataError(f"{path}: unknown table format {ext or '(no extension)'!r}",
                        hint=f"use one of {', '.join(sorted(_TABLE_READERS))}")
    return _TABLE_READERS[ext].format(path=sql_literal(str(path)))


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def describe(con: duckdb.DuckDBPyConnection, path: Path, reader: str) -> dict[str, str]:
    """Column name -> DuckDB type of a file, with a one-line error when DuckDB cannot parse it."""
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()
    except duckdb.Error as exc:
        raise DataError(f"{path}: cannot read it ({first_line(exc)})") from None
    return {r[0]: r[1] for r in rows}


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def require_columns(path: Path, columns: dict[str, str], wanted: dict[str, str]) -> None:
    """`wanted` maps option name -> column; a missing one names the option, the column and what exists."""
    for option, col in wanted.items():
        if col not in columns:
            raise DataError(f"{path}: no column {col!r} (from {option}); columns are {', '.join(columns)}")


def require_times(con: duckdb.DuckDBPyConnection, path: Path, source: str, col: str) -> None:
    """Every row needs a time: a missing one would otherwise sort by row number, before all real times."""
    q = quote_ident(col)
    missing, first = one_row(
        con, f"SELECT count(*), min(r) FROM (SELECT row_number() OVER () AS r, {q} AS v FROM {source}) WHERE v IS NULL"
    )
    if missing:
        raise DataError(f"{path}: column {col!r} is empty in {missing} row(s) (the first is data row {first}); "
                        "every interaction needs a time")


def time_expression(con: duckdb.DuckDBPyConnection, path: Path, source: str, col: str, dtype: str) -> str:
    """SQL turning a time column into int64 (numbers as is, timestamps/ISO dates as epoch seconds)."""
    q = quote_ident(col)
    if dtype.startswith(("TIMESTAMP", "DATE")):
        return f"epoch({q})::BIGINT"
    if dtype in {"BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT", "UINTEGER", "DOUBLE",
                 "FLOAT", "REAL"} or dtype.startswith("DECIMAL"):
        huge = con.execute(f"SELECT {q}::VARCHAR FROM {source} WHERE {q} IS NOT NULL AND TRY_CAST({q} AS BIGINT) "
                           "IS NULL LIMIT 1").fetchone()
        if huge is not None:  # a plain CAST would stop the import with DuckDB's ConversionException
            raise DataError(f"{path}: column {col!r} has a timestamp out of range (e.g. {huge[0]!r}); "
                            "expected epoch numbers within 64 bits")
        return f"CAST({q} AS BIGINT)"
    expr = (f"COALESCE(TRY_CAST(TRY_CAST({q} AS DOUBLE) AS BIGINT), "
            f"epoch(TRY_CAST({q} AS TIMESTAMP))::BIGINT)")
    bad = con.execute(
        f"SELECT {q}::VARCHAR FROM {source} WHERE {q} IS NOT NULL AND {expr} IS NULL LIMIT 1"
    ).fetchone()
    if bad is not None:
        raise DataError(f"{path}: column {col!r} has non-numeric timestamps (e.g. {bad[0]!r}); "
                        "expected numbers (epoch) or ISO-8601 dates")
    return expr


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_files(cfg: PrepareConfig) -> SourceFiles:
    return SourceFiles([require_file(input_path(cfg), "interactions")],
                       require_file(cfg.items, "item metadata") if cfg.items else None)


def load_table(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, files: SourceFiles) -> SourceInfo:
    path = files.interactions[0]
    reader = table_reader(path)
    columns = describe(con, path, reader)
    user_col, item_col = cfg.user_col, cfg.item_col
    assert user_col is not None and item_col is not None, "PrepareConfig: source 'table' needs both"
    wanted = {"--user-col": user_col, "--item-col": item_col}
    if cfg.time_col:
        wanted["--time-col"] = cfg.time_col
    if cfg.rating_col:
        wanted["--rating-col"] = cfg.rating_col
    require_columns(path, columns, wanted)
    con.execute(f"CREATE OR REPLACE TABLE src AS SELECT * FROM {reader}")
    ts = "NULL"
    if cfg.time_col:
        require_times(con, path, "src", cfg.time_col)
        ts = time_expression(con, path, "src", cfg.time_col, columns[cfg.time_col])
    rating = f"TRY_CAST({quote_ident(cfg.rating_col)} AS DOUBLE)" if cfg.rating_col else "NULL"
    con.execute(
        f"CREATE OR REPLACE TABLE raw AS SELECT {quote_ident(user_col)}::VARCHAR AS user_key, "
        f"{quote_ident(item_col)}::VARCHAR AS item_key, {ts}::BIGINT AS ts, {rating}::DOUBLE AS rating, "
        f"(row_number() OVER () - 1)::BIGINT AS ord FROM src"
    )
    con.execute("DROP TABLE src")
    info = SourceInfo(has_time=cfg.time_col is not None, has_rating=cfg.rating_col is not None)
    if files.items is None:
        empty_items(con)
        return info
    ireader = table_reader(files.items)
    icols = describe(con, files.items, ireader)
    key = cfg.item_key_col or item_col
    require_columns(files.items, icols, {"--item-key-col": key})
    texts = [c for c in icols if c != key]
    select = ", ".join(f"{quote_ident(c)}::VARCHAR AS {quote_ident(safe_field_name(c))}" for c in texts)
    con.execute(f"CREATE OR REPLACE TABLE raw_items AS SELECT {quote_ident(key)}::VARCHAR AS item_key"
                f"{', ' + select if select else ''} FROM {ireader}")
    repeated = con.execute("SELECT item_key, count(*) FROM raw_items WHERE item_key IS NOT NULL GROUP BY 1 "
                           "HAVING count(*) > 1 ORDER BY 2 DESC, 1 LIMIT 1").fetchone()
    if repeated is not None:  # prepare would keep one of the rows, which one undefined: the text must be one
        raise DataError(f"{files.items}: item key {repeated[0]!r} has {repeated[1]} rows (column {key!r}); "
                        "every item needs exactly one row of text")
    info.text_fields = [safe_field_name(c) for c in texts]
    return info


# ---------------------------------------------------------------------------------------------------
# recbole atomic files: TSV with typed headers `name:type` (.inter, .item)


def recbole_files(cfg: PrepareConfig) -> SourceFiles:
    return interactions_and_items(cfg, "*.inter", "RecBole interactions", lambda p: p.with_suffix(".item"))


def _recbole_relation(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[str, dict[str, str]]:
    """A DuckDB reader for a RecBole atomic file and its columns, `name:type` header stripped."""
    reader = (f"read_csv({sql_literal(str(path))}, delim='\t', header=true, quote='\"', escape='\"', "
              f"all_varchar=true, strict_mode=false)")
    columns = describe(con, path, reader)
    return reader, {c.split(":", 1)[0]: c for c in columns}


def load_recbole(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, files: SourceFiles) -> SourceInfo:
    path = files.interactions[0]
    reader, cols = _recbole_relation(con, path)
    require_columns(path, cols, {"user_id:token": "user_id", "item_id:token": "item_id"})
    con.execute(f"CREATE OR REPLACE TABLE src AS SELECT * FROM {reader}")
    ts = "NULL"
    if "timestamp" in cols:
        require_times(con, path, "src", cols["timestamp"])
        ts = time_expression(con, path, "src", cols["timestamp"], "VARCHAR")
    rating = f"TRY_CAST({quote_ident(cols['rating'])} AS DOUBLE)" if "rating" in cols else "NULL"
    con.execute(
        f"CREATE OR REPLACE TABLE raw AS SELECT {quote_ident(cols['user_id'])} AS user_key, "
        f"{quote_ident(cols['item_id'])} AS item_key, {ts}::BIGINT AS ts, {rating}::DOUBLE AS rating, "
        f"(row_number() OVER () - 1)::BIGINT AS ord FROM src"
    )
    con.execute("DROP TABLE src")
    info = SourceInfo(has_time="timestamp" in cols, has_rating="rating" in cols)
    if files.items is None:
        empty_items(con)
        info.notes.append("no .item file: items have no text")
        return info
    ireader, icols = _recbole_relation(con, files.items)
    require_columns(files.items, icols, {"item_id:token": "item_id"})
    texts = [name for name in icols if name != "item_id"]
    select = "".join(f", {quote_ident(icols[n])} AS {quote_ident(safe_field_name(n))}" for n in texts)
    con.execute(f"CREATE OR REPLACE TABLE raw_items AS SELECT {quote_ident(icols['item_id'])} AS item_key"
                f"{select} FROM {ireader}")
    info.text_fields = [safe_field_name(n) for n in texts]
    return info


Importer = tuple[Callable[[PrepareConfig], SourceFiles],
                 Callable[[duckdb.DuckDBPyConnection, PrepareConfig, SourceFiles], SourceInfo]]
