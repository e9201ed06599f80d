"""Files the user names (exports, not workspace artifacts): the format from the suffix, writers for
Parquet, CSV and JSONL, and all-or-nothing writes of several files (each to a temporary file beside it,
all renamed into place only once every one is written; missing parent directories are created).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bloger_cli.artifacts import sql_literal, temp_path_for
from bloger_cli.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
CSV_SPREAD = {"codes": "code", "vector": "vector"}  # list column -> CSV column prefix (code_1, code_2, ...)


class OutFile(NamedTuple):
    """One file of an export: the option that named it, where, in which format, and what."""

    option: str  # the CLI option that named it, for error messages
    path: Path
    format: str
    table: pa.Table


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


def compare_format(path: Path) -> str:
    """The format of an earlier export given to --compare, from its suffix."""
    if not path.is_file():
        raise DataError(f"--compare {path}: file not found", hint="give an earlier `bloger export-ids` output")
    if path.suffix.lower() not in SUFFIXES:
        said = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise ConfigError(f"--compare {path}: cannot tell the format from {said}",
                          hint="--compare reads .parquet, .csv and .jsonl exports")
    return SUFFIXES[path.suffix.lower()]


def write_files(con: duckdb.DuckDBPyConnection, files: list[OutFile], metadata: dict[str, str]) -> None:
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


def _make_parent(file: OutFile) -> None:
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
        con.execute(f"COPY (SELECT {select} FROM export_rows) TO {sql_literal(path)} (FORMAT json)")
    finally:
        con.unregister("export_rows")


WRITERS: dict[str, Callable[[duckdb.DuckDBPyConnection, pa.Table, Path, dict[str, str]], None]] = {
    "parquet": _write_parquet, "csv": _write_csv, "jsonl": _write_jsonl,
}
