"""Amazon review dumps: 2014 and 2018 (`amazon`), and Amazon Reviews 2023 (`amazon2023`).

Reviews are JSON lines (gzip or not) read by DuckDB's `read_json` with a fixed schema, so no Python
runs per review:
- 2014/2018: `reviews_Beauty.json.gz`, `reviews_Beauty_5.json.gz`, `Beauty_5.json.gz`,
  `All_Beauty.json.gz`, ... with reviewerID, asin, overall, unixReviewTime (seconds).
- 2023: `Beauty_and_Personal_Care.jsonl.gz` with user_id, parent_asin (else asin), rating and
  timestamp in milliseconds (stored in seconds, like every other source; equal seconds keep file order).

Metadata (`meta_<category>.json(l)(.gz)`, found beside the reviews, or `--items`) becomes item text,
kept only for reviewed items. 2014 meta lines are Python literals (single quotes), not JSON, so
2014/2018 meta is parsed in Python one item line at a time (streamed; lines of unreviewed items are
skipped before parsing). 2023 meta is strict JSON lines and goes through DuckDB like the reviews.

A malformed file gets one error naming the file and the first bad line: DuckDB's own JSON errors
count lines inexactly, so on failure the file is scanned once in Python to find it.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from bloger_cli.config import PrepareConfig
from bloger_cli.data.sources import (
    SourceFiles,
    SourceInfo,
    empty_items,
    first_line,
    quote_ident,
    register_items,
    require_file,
    sql_literal,
    text_value,
)
from bloger_cli.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Reviews:
    """One review format: its file extension, the JSON keys it needs, and how they map to `raw`."""

    label: str
    ext: str  # ".json" or ".jsonl", optionally followed by ".gz"
    columns: dict[str, str]  # JSON key -> DuckDB type
    required: tuple[tuple[str, ...], ...]  # each group: at least one key present and not null
    user: str  # SQL over the columns
    item: str
    ts: str
    rating: str

    @property
    def expected(self) -> str:
        keys = ", ".join("/".join(group) for group in self.required)
        return f"Amazon {self.label} review lines with {keys}"


REVIEWS_2014 = _Reviews(
    label="2014/2018", ext=".json",
    columns={"reviewerID": "VARCHAR", "asin": "VARCHAR", "overall": "DOUBLE", "unixReviewTime": "BIGINT"},
    required=(("reviewerID",), ("asin",), ("unixReviewTime",)),
    user="reviewerID", item="asin", ts="unixReviewTime", rating="overall",
)
REVIEWS_2023 = _Reviews(
    label="2023", ext=".jsonl",
    columns={"user_id": "VARCHAR", "parent_asin": "VARCHAR", "asin": "VARCHAR", "rating": "DOUBLE",
             "timestamp": "BIGINT"},
    required=(("user_id",), ("parent_asin", "asin"), ("timestamp",)),
    user="user_id", item="COALESCE(parent_asin, asin)", ts="\"timestamp\" // 1000", rating="rating",
)

# 2014/2018 meta keys -> item text fields (2018 renamed a few; both land in one column)
META_FIELDS = {"title": "title", "brand": "brand", "main_cat": "main_category", "categories": "categories",
               "category": "categories", "feature": "features", "description": "description", "price": "price"}
TEXT_ORDER = ["title", "brand", "main_category", "categories", "features", "description", "price"]
_ASIN = re.compile(rb"""["']asin["']\s*:\s*["']([^"'\\]+)["']""")

# 2023 meta: text field -> SQL over read_json's columns (lists joined with ', ', 'None' prices dropped)
META_2023_COLUMNS = {"parent_asin": "VARCHAR", "title": "JSON", "store": "JSON", "main_category": "JSON",
                     "categories": "JSON", "features": "JSON", "description": "JSON", "price": "JSON",
                     "details": "JSON"}
META_2023_FIELDS = {"title": "json_text(title)", "store": "json_text(store)",
                    "brand": "nullif(trim(details->>'$.Brand'), '')",
                    "main_category": "json_text(main_category)", "categories": "json_text(categories)",
                    "features": "json_text(features)", "description": "json_text(description)",
                    "price": "nullif(json_text(price), 'None')"}
_JSON_TEXT = """CREATE OR REPLACE TEMP MACRO json_text(j) AS CASE
  WHEN j IS NULL OR json_type(j) = 'NULL' THEN NULL
  WHEN json_type(j) = 'ARRAY' THEN nullif(array_to_string(list_filter(list_transform(
      from_json(j, '["VARCHAR"]'), lambda s: trim(s)), lambda s: s <> ''), ', '), '')
  WHEN json_type(j) = 'OBJECT' THEN j::VARCHAR
  ELSE nullif(trim(j->>'$'), '') END"""


# ---------------------------------------------------------------------------------------------------
# Files


def _has_ext(path: Path, ext: str) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(ext) or name.endswith(ext + ".gz"))


def _category(path: Path, ext: str) -> str:
    """`reviews_Beauty_5.json.gz` -> `Beauty` (what the meta file is named after)."""
    name = path.name
    name = name[:-3] if name.lower().endswith(".gz") else name
    name = name[: -len(ext)] if name.lower().endswith(ext) else path.stem
    name = name.removeprefix("reviews_")
    return name.removesuffix("_5")


def _reviews_in(directory: Path, fmt: _Reviews) -> Path:
    """The one reviews file in a directory: `reviews_*` first, else any non-meta file of the format."""
    files = sorted(p for p in directory.iterdir() if _has_ext(p, fmt.ext) and not p.name.startswith("meta_"))
    picked = [p for p in files if p.name.startswith("reviews_")] or files
    if len(picked) == 1:
        return picked[0]
    if not picked:
        raise DataError(f"no Amazon {fmt.label} reviews file (*{fmt.ext} or *{fmt.ext}.gz, not meta_*) "
                        f"in {directory}")
    raise DataError(f"{directory} holds several Amazon reviews files ({', '.join(p.name for p in picked)})",
                    hint="give the file itself with --input")


def _meta_beside(reviews: Path, fmt: _Reviews, in_directory: bool) -> Path | None:
    """`meta_<category>` beside the reviews; in a directory input, else its only meta_* file."""
    stem = _category(reviews, fmt.ext)
    for name in (f"meta_{stem}{fmt.ext}", f"meta_{stem}{fmt.ext}.gz"):
        if (reviews.parent / name).is_file():
            return reviews.parent / name
    if not in_directory:
        return None
    metas = sorted(p for p in reviews.parent.glob("meta_*") if _has_ext(p, fmt.ext))
    if len(metas) > 1:
        raise DataError(f"{reviews.parent} holds several meta files ({', '.join(p.name for p in metas)}) "
                        f"and none is named meta_{stem}{fmt.ext}[.gz]", hint="give one with --items")
    return metas[0] if metas else None


def _files(cfg: PrepareConfig, fmt: _Reviews) -> SourceFiles:
    path = cfg.input
    in_directory = path.is_dir()
    if in_directory:
        path = _reviews_in(path, fmt)
    require_file(path, f"Amazon {fmt.label} reviews")
    items = cfg.items or _meta_beside(path, fmt, in_directory)
    return SourceFiles([path], require_file(items, "item metadata") if items else None)


def amazon_files(cfg: PrepareConfig) -> SourceFiles:
    return _files(cfg, REVIEWS_2014)


def amazon2023_files(cfg: PrepareConfig) -> SourceFiles:
    return _files(cfg, REVIEWS_2023)


# ---------------------------------------------------------------------------------------------------
# Line access for the Python paths (meta parsing, locating a bad line)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for the non-blank lines of a file, gzip or not."""
    lineno = 0
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, line
    except EOFError:
        raise DataError(f"{path}: the gzip data ends after line {lineno} (truncated download?)",
                        hint="download the file again") from None
    except (OSError, zlib.error) as exc:
        raise DataError(f"{path}: cannot decompress it after line {lineno} ({exc})") from None


def _decode(path: Path, lineno: int, line: bytes) -> str:
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line {lineno} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _first_bad_line(path: Path, required: tuple[tuple[str, ...], ...]) -> str | None:
    """What is wrong with the first bad line (not JSON, not an object, a required key missing), if any."""
    for lineno, line in _lines(path):
        try:
            record = json.loads(_decode(path, lineno, line))
        except json.JSONDecodeError as exc:
            return f"line {lineno} is not valid JSON ({exc.msg}: column {exc.colno})"
        if not isinstance(record, dict):
            return f"line {lineno} is not a JSON object"
        for keys in required:
            if all(record.get(k) is None for k in keys):
                return f"line {lineno} has no {' or '.join(map(repr, keys))}"
    return None


def _bad_file(path: Path, required: tuple[tuple[str, ...], ...], expected: str, fallback: str) -> DataError:
    """The error for an unreadable JSON-lines file, naming its first bad line when one can be found."""
    reason = _first_bad_line(path, required) or fallback
    return DataError(f"{path}: {reason}", hint=f"expected {expected}")


# ---------------------------------------------------------------------------------------------------
# Reviews -> raw


def _json_lines(path: Path, columns: dict[str, str]) -> str:
    """DuckDB's JSON-lines reader with a fixed schema: other keys are never parsed into columns."""
    schema = "{" + ", ".join(f"{sql_literal(k)}: {sql_literal(t)}" for k, t in columns.items()) + "}"
    return f"read_json({sql_literal(str(path))}, format='newline_delimited', columns={schema})"


def _load_reviews(con: duckdb.DuckDBPyConnection, path: Path, fmt: _Reviews) -> SourceInfo:
    reader = _json_lines(path, fmt.columns)
    try:
        con.execute(
            f"CREATE OR REPLACE TABLE raw AS SELECT {fmt.user}::VARCHAR AS user_key, {fmt.item}::VARCHAR AS "
            f"item_key, ({fmt.ts})::BIGINT AS ts, {fmt.rating}::DOUBLE AS rating, "
            f"(row_number() OVER () - 1)::BIGINT AS ord FROM {reader}"
        )
    except duckdb.Error as exc:
        raise _bad_file(path, fmt.required, fmt.expected, f"cannot read it ({first_line(exc)})") from None
    incomplete, rated = con.execute(
        "SELECT count(*) FILTER (WHERE user_key IS NULL OR item_key IS NULL OR ts IS NULL), count(rating) FROM raw"
    ).fetchone()
    if incomplete:
        raise _bad_file(path, fmt.required, fmt.expected, f"{incomplete} reviews lack a user, item or time")
    return SourceInfo(has_time=True, has_rating=rated > 0)


def _no_meta(con: duckdb.DuckDBPyConnection, info: SourceInfo, reviews: Path) -> SourceInfo:
    empty_items(con)
    info.notes.append(f"no meta_* file beside {reviews.name}: items have no text (give one with --items)")
    return info


def _drop_empty_fields(con: duckdb.DuckDBPyConnection, fields: list[str]) -> list[str]:
    """Drop text columns that no item fills (a 2014 file has no `features`); returns those kept."""
    if not fields:
        return []
    counts = con.execute("SELECT " + ", ".join(f"count({quote_ident(f)})" for f in fields)
                         + " FROM raw_items").fetchone()
    for f, n in zip(fields, counts):
        if n == 0:
            con.execute(f"ALTER TABLE raw_items DROP COLUMN {quote_ident(f)}")
    return [f for f, n in zip(fields, counts) if n > 0]


# ---------------------------------------------------------------------------------------------------
# amazon (2014/2018)


def load_amazon(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, files: SourceFiles) -> SourceInfo:
    path = files.interactions[0]
    info = _load_reviews(con, path, REVIEWS_2014)
    if files.items is None:
        return _no_meta(con, info, path)
    wanted = {row[0] for row in con.execute("SELECT DISTINCT item_key FROM raw").fetchall()}
    records = _read_meta(files.items, wanted)
    if not records:
        info.notes.append(f"{files.items.name} describes none of the reviewed items: items have no text")
    info.text_fields = _drop_empty_fields(con, register_items(con, records))
    return info


def _parse_meta_line(path: Path, lineno: int, line: bytes) -> dict[str, Any]:
    """One meta line: JSON (2018) or a Python dict literal (2014); a dict with an 'asin'."""
    text = _decode(path, lineno, line)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.startswith('{"'):
            raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg}: column {exc.colno})") from None
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{path}: line {lineno} is neither JSON nor a Python dict literal "
                            "(truncated or corrupt line?)") from None
    if not isinstance(record, dict) or record.get("asin") is None:
        raise DataError(f"{path}: line {lineno} has no 'asin'", hint="expected Amazon meta_* item lines")
    return record


def _read_meta(path: Path, wanted: set[str]) -> dict[str, dict[str, str | None]]:
    """{asin: {text field: text}} for the reviewed items, streaming the file line by line."""
    records: dict[str, dict[str, str | None]] = {}
    skipped = 0
    for lineno, line in _lines(path):
        hit = _ASIN.search(line)  # skip unreviewed items before the (slow, for 2014) parse
        if hit is not None and hit[1].decode("utf-8", "replace") not in wanted:
            skipped += 1
            continue
        record = _parse_meta_line(path, lineno, line)
        key = str(record["asin"])
        if key not in wanted or key in records:  # first line of a repeated asin wins
            continue
        fields: dict[str, Any] = dict.fromkeys(TEXT_ORDER)
        for name, field in META_FIELDS.items():
            if fields[field] is None and name in record:
                fields[field] = text_value(record[name])
        records[key] = fields
    log.info("%s: text for %d reviewed items (%d lines of other items skipped)", path, len(records), skipped)
    return records


# ---------------------------------------------------------------------------------------------------
# amazon2023


def load_amazon2023(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, files: SourceFiles) -> SourceInfo:
    path = files.interactions[0]
    info = _load_reviews(con, path, REVIEWS_2023)
    if files.items is None:
        return _no_meta(con, info, path)
    meta = files.items
    reader = _json_lines(meta, META_2023_COLUMNS)
    select = ", ".join(f"{sql}::VARCHAR AS {quote_ident(name)}" for name, sql in META_2023_FIELDS.items())
    con.execute(_JSON_TEXT)
    try:
        con.execute(f"CREATE OR REPLACE TABLE raw_items AS SELECT parent_asin AS item_key, {select} FROM {reader} "
                    "WHERE parent_asin IN (SELECT item_key FROM raw)")
    except duckdb.Error as exc:
        raise _bad_file(meta, (("parent_asin",),), "Amazon 2023 meta lines with parent_asin",
                        f"cannot read it ({first_line(exc)})") from None
    info.text_fields = _drop_empty_fields(con, list(META_2023_FIELDS))
    return info
