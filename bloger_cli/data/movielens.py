"""MovieLens ratings through DuckDB's CSV reader: no Python step per rating or per movie.

Layouts (told apart by the ratings file's first line, so renamed files such as ml-100k's `u1.base` work):
- ml-100k: `u.data` (user TAB movie TAB rating TAB ts) and `u.item` (`|`-separated, latin-1:
  id|title|release date|video release date|IMDb URL|19 genre flags 0/1).
- ml-1m, ml-10m: `ratings.dat` (`user::movie::rating::ts`) and `movies.dat` (`id::title::genres`,
  genres `|`-separated; ml-1m is latin-1, ml-10m UTF-8).
- ml-20m and later (ml-25m, ml-32m, ml-latest): `ratings.csv` and `movies.csv` with headers.

Item text fields: `title` (without the trailing "(1995)"), `genres` ("Action, Comedy") and `year`
(from the title, else from ml-100k's release date). Movie files are read as UTF-8 and, when that
fails, as latin-1 (which decodes any byte), so the version need not be known.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from bloger_cli.config import PrepareConfig
from bloger_cli.data.sources import (
    SourceFiles,
    SourceInfo,
    empty_items,
    find_one,
    first_line,
    require_file,
    sql_literal,
)
from bloger_cli.errors import DataError

log = logging.getLogger(__name__)

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
               "Thriller", "War", "Western")
NO_GENRE = ("unknown", "(no genres listed)")  # placeholders, not text worth embedding
TEXT_FIELDS = ["title", "genres", "year"]
_RATING_COLUMNS = "{'user': 'VARCHAR', 'movie': 'VARCHAR', 'rating': 'DOUBLE', 'timestamp': 'BIGINT'}"
_CSV_LINE = re.compile(r"CSV Error on Line: (\d+)")
_CSV_FIELDS = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")
_CSV_CONVERT = re.compile(r'converting column "([^"]+)"\. Could not convert string "([^"]*)"')


@dataclass(frozen=True)
class _Layout:
    """One MovieLens file layout: file names and how DuckDB reads them."""

    name: str
    ratings: str  # the ratings file's usual name
    movies: str  # the movies file's usual name
    delim: str  # the ratings file's field separator
    movies_delim: str
    header: bool


LAYOUTS = (
    _Layout("ml-100k", "u.data", "u.item", "\t", "|", False),
    _Layout("ml-1m/ml-10m", "ratings.dat", "movies.dat", "::", "::", False),
    _Layout("ml-20m+", "ratings.csv", "movies.csv", ",", ",", True),
)
_CSV_HEADER = b"userId,movieId,rating,timestamp"


def _first_line(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.readline(4096).rstrip(b"\r\n")


def _layout_of(path: Path) -> _Layout:
    """The layout of a ratings file, from its first line; a clear error for anything else."""
    if path.suffix.lower() in {".zip", ".gz", ".tar"}:
        raise DataError(f"{path} is an archive", hint="unpack it and give the directory with --input")
    line = _first_line(path)
    if b"::" in line:
        return LAYOUTS[1]
    if b"\t" in line:
        return LAYOUTS[0]
    if line.startswith(_CSV_HEADER):
        return LAYOUTS[2]
    raise DataError(f"{path}: not a MovieLens ratings file (first line {line[:80].decode('latin-1')!r})",
                    hint="expected u.data (tab-separated), ratings.dat (user::movie::rating::ts) "
                         "or ratings.csv (userId,movieId,rating,timestamp)")


def movielens_files(cfg: PrepareConfig) -> SourceFiles:
    path = cfg.input
    if path.is_dir():
        path = find_one(path, [layout.ratings for layout in LAYOUTS], "MovieLens ratings")
    require_file(path, "ratings")
    items = cfg.items
    if items is None:
        guess = path.with_name(_layout_of(path).movies)
        items = guess if guess.is_file() else None
    return SourceFiles([path], require_file(items, "movies") if items else None)


def _csv(path: Path, layout: _Layout, columns: str, encoding: str = "utf-8", *, movies: bool = False) -> str:
    """A strict read_csv call: fixed columns, no sniffing, no quoting (titles hold bare quotes)."""
    quote = "quote='\"', escape='\"'" if layout.header else "quote='', escape=''"
    delim = layout.movies_delim if movies else layout.delim
    return (f"read_csv({sql_literal(str(path))}, delim={sql_literal(delim)}, "
            f"header={str(layout.header).lower()}, auto_detect=false, {quote}, columns={columns}, "
            f"encoding={sql_literal(encoding)})")


def _csv_error(path: Path, exc: duckdb.Error) -> DataError:
    """DuckDB's CSV error as one line naming the file and the line."""
    text = str(exc)
    line = _CSV_LINE.search(text)
    if line is None:
        return DataError(f"{path}: cannot read it ({first_line(exc)})")
    if (m := _CSV_FIELDS.search(text)) is not None:
        return DataError(f"{path}: line {line[1]} has {m[2]} fields, expected {m[1]}")
    if (m := _CSV_CONVERT.search(text)) is not None:
        return DataError(f"{path}: line {line[1]}: {m[1]} {m[2]!r} is not a number")
    return DataError(f"{path}: line {line[1]} is malformed ({first_line(exc)})")


def load_movielens(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, files: SourceFiles) -> SourceInfo:
    path = files.interactions[0]
    layout = _layout_of(path)
    log.info("reading %s as MovieLens %s", path, layout.name)
    try:
        con.execute(
            "CREATE OR REPLACE TABLE raw AS SELECT \"user\" AS user_key, movie AS item_key, "
            "\"timestamp\"::BIGINT AS ts, rating::DOUBLE AS rating, (row_number() OVER () - 1)::BIGINT AS ord "
            f"FROM {_csv(path, layout, _RATING_COLUMNS)}"
        )
    except duckdb.Error as exc:
        raise _csv_error(path, exc) from None
    _check_complete(con, path, layout)
    info = SourceInfo(has_time=True, has_rating=True)
    if files.items is None:
        empty_items(con)
        info.notes.append(f"no {layout.movies} beside {path.name}: items have no text (give one with --items)")
        return info
    _load_movies(con, files.items)
    info.text_fields = list(TEXT_FIELDS)
    return info


def _check_complete(con: duckdb.DuckDBPyConnection, path: Path, layout: _Layout) -> None:
    """Empty fields read as NULL; a rating without user, movie or time is an error, not a silent gap."""
    row = con.execute("SELECT min(ord) FROM raw WHERE user_key IS NULL OR item_key IS NULL OR ts IS NULL "
                      "OR rating IS NULL").fetchone()
    if row[0] is not None:
        line = int(row[0]) + 1 + int(layout.header)
        raise DataError(f"{path}: line {line} has an empty field; every rating needs user, movie, rating "
                        "and timestamp")


def _movies_layout(path: Path) -> tuple[_Layout, str, str]:
    """(layout, read_csv columns, SELECT list) for a movies file, from its first line."""
    line = _first_line(path)
    if b"::" in line or line.startswith(b"movieId,"):
        layout = LAYOUTS[1] if b"::" in line else LAYOUTS[2]
        cols = "{'movie': 'VARCHAR', 'title': 'VARCHAR', 'genres': 'VARCHAR'}"
        return layout, cols, f"movie, title, {_genre_list('genres')} AS genres, NULL AS released"
    if line.count(b"|") == 4 + len(GENRES_100K):
        names = ["movie", "title", "released", "video_released", "url", *(f"g{i}" for i in range(len(GENRES_100K)))]
        cols = "{" + ", ".join(f"'{n}': 'VARCHAR'" for n in names) + "}"
        flags = ", ".join(f"CASE WHEN g{i} = '1' THEN {sql_literal(g)} END"
                          for i, g in enumerate(GENRES_100K) if g not in NO_GENRE)
        return LAYOUTS[0], cols, f"movie, title, concat_ws(', ', {flags}) AS genres, released"
    raise DataError(f"{path}: not a MovieLens movies file (first line {line[:80].decode('latin-1')!r})",
                    hint="expected u.item (24 '|'-separated fields), movies.dat (id::title::genres) "
                         "or movies.csv (movieId,title,genres)")


def _genre_list(col: str) -> str:
    placeholders = ", ".join(sql_literal(g) for g in NO_GENRE)
    return (f"array_to_string(list_filter(string_split({col}, '|'), "
            f"lambda g: trim(g) <> '' AND g NOT IN ({placeholders})), ', ')")


def _load_movies(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """`raw_items(item_key, title, genres, year)`; UTF-8 first, latin-1 when that fails."""
    layout, columns, select = _movies_layout(path)
    title_year = sql_literal(r"\s*\((\d{4})\)\s*$")  # "Heat (1995)" -> "Heat", "1995"
    date_year = sql_literal(r"(\d{4})\s*$")  # ml-100k release date "01-Jan-1995"
    for encoding in ("utf-8", "latin-1"):
        try:
            con.execute(
                "CREATE OR REPLACE TABLE raw_items AS SELECT movie AS item_key, "
                f"nullif(trim(regexp_replace(title, {title_year}, '')), '') AS title, nullif(genres, '') AS genres, "
                f"COALESCE(nullif(regexp_extract(title, {title_year}, 1), ''), "
                f"nullif(regexp_extract(released, {date_year}, 1), '')) AS year "
                f"FROM (SELECT {select} FROM {_csv(path, layout, columns, encoding, movies=True)})"
            )
            return
        except duckdb.Error as exc:
            if encoding == "utf-8" and "Invalid unicode" in str(exc):
                log.info("%s is not UTF-8; reading it as latin-1", path)
                continue
            raise _csv_error(path, exc) from None
