"""Recommendations streamed to Parquet, CSV or JSONL, batch by batch, into a temporary file beside the
output that is renamed into place only when every batch is written: nothing half-written, and a
million users never need their results in memory at once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bloger_cli.artifacts import temp_path_for
from bloger_cli.errors import ConfigError
from bloger_cli.outputs import SUFFIXES


def check_output(path: Path, force: bool, option: str = "--out") -> str:
    """The output's format; refuses a missing directory, a directory, and an existing file without force."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        said = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise ConfigError(f"{option} {path}: cannot tell the format from {said}",
                          hint="end the name in .parquet, .csv or .jsonl")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: directory {path.parent} does not exist",
                          hint=f"create it first (mkdir -p {path.parent})")
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory", hint="give a file name")
    if path.exists() and not force:
        raise ConfigError(f"{option} {path} exists", hint="give --force to replace it")
    return fmt


class RowWriter:
    """`with RowWriter(path, fmt, schema) as out: out.write(table)`; renamed into place on a clean exit."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        self.path, self.format, self.schema = path, fmt, schema
        self.tmp = temp_path_for(path)
        self.rows = 0
        self._parquet: pq.ParquetWriter | None = None
        self._csv: pacsv.CSVWriter | None = None
        self._jsonl: IO[str] | None = None

    def __enter__(self) -> RowWriter:
        if self.format == "parquet":
            self._parquet = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        elif self.format == "csv":
            self._csv = pacsv.CSVWriter(self.tmp, self.schema)
        else:
            self._jsonl = open(self.tmp, "w", encoding="utf-8")
        return self

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        if self._parquet is not None:
            self._parquet.write_table(table)
        elif self._csv is not None:
            self._csv.write_table(table)
        else:
            self._jsonl.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in table.to_pylist())
        self.rows += table.num_rows

    def _close(self) -> None:
        for handle in (self._parquet, self._csv, self._jsonl):
            if handle is not None:
                handle.close()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._close()
            if kind is None:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
