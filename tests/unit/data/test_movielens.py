"""MovieLens importer: hand-written ml-100k, ml-1m, ml-10m and ml-20m style files through `prepare.run`."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import exactly, import_source

from bloger_cli.config import PrepareConfig
from bloger_cli.errors import DataError
from bloger_cli.stages import prepare
from bloger_cli.workspace import Workspace

ARTIFACTS = ("interactions", "items", "sequences")


def run(tmp_path: Path, input: Path, items: Path | None = None) -> tuple[dict, dict[str, list[dict]]]:
    cfg = PrepareConfig(source="movielens", input=input, items=items, min_user_interactions=1,
                        min_item_interactions=1)
    out = prepare.run(cfg, Workspace(tmp_path / "ws"))
    tables = {name: pq.read_table(tmp_path / "ws" / f"{name}.parquet").to_pylist() for name in ARTIFACTS}
    return out.result, tables


def load(input: Path, items: Path | None = None) -> None:
    import_source("movielens", input, items)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def flags(*genres: int) -> str:
    return "|".join("1" if i in genres else "0" for i in range(19))


# Two users, three movies; user 2 rates 10 and 30 at the same second (file order breaks the tie).
U_DATA = "1\t20\t3\t200\n1\t10\t5\t100\n2\t30\t4\t50\n1\t30\t4\t150\n2\t10\t2\t50\n2\t20\t1\t60\n"
EXPECTED_INTERACTIONS = [
    {"user_id": 0, "item_id": 0, "ts": 100}, {"user_id": 0, "item_id": 2, "ts": 150},
    {"user_id": 0, "item_id": 1, "ts": 200}, {"user_id": 1, "item_id": 2, "ts": 50},
    {"user_id": 1, "item_id": 0, "ts": 50}, {"user_id": 1, "item_id": 1, "ts": 60},
]
EXPECTED_SEQUENCES = [{"user_id": 0, "items": [0, 2, 1], "ts": [100, 150, 200]},
                      {"user_id": 1, "items": [2, 0, 1], "ts": [50, 50, 60]}]


def test_ml100k_directory_latin1_items_and_genre_flags(tmp_path: Path) -> None:
    src = tmp_path / "ml-100k"
    write(src / "u.data", U_DATA)
    write(src / "u.item", (
        f"10|Toy Story (1995)|01-Jan-1995||http://imdb/toy|{flags(3, 4, 5)}\n"
        f"20|Caf\xe9 Society|01-Jan-1996||http://imdb/cafe|{flags(0)}\n"
        f"30|unknown||||{flags(0)}\n"
        f"40|Not Rated (1999)|01-Jan-1999||http://imdb/nr|{flags(8)}\n"
    ).encode("latin-1"))
    result, tables = run(tmp_path, src)
    assert tables["interactions"] == EXPECTED_INTERACTIONS
    assert tables["sequences"] == EXPECTED_SEQUENCES
    assert tables["items"] == [
        {"item_id": 0, "item_key": "10", "n_interactions": 2, "title": "Toy Story",
         "genres": "Animation, Children's, Comedy", "year": "1995"},
        {"item_id": 1, "item_key": "20", "n_interactions": 2, "title": "Café Society", "genres": None,
         "year": "1996"},
        {"item_id": 2, "item_key": "30", "n_interactions": 2, "title": "unknown", "genres": None, "year": None},
    ]
    assert result["text_fields"] == ["title", "genres", "year"]


def test_ml1m_latin1_dat_files(tmp_path: Path) -> None:
    src = tmp_path / "ml-1m"
    write(src / "ratings.dat", U_DATA.replace("\t", "::"))
    write(src / "movies.dat", (
        '10::"Great Performances" Cats (1998)::Musical\n'
        "20::Caf\xe9, The (1995)::Comedy|Drama\n"
        "30::Heat (1995)::Action|Crime|Thriller\n"
    ).encode("latin-1"))
    _, tables = run(tmp_path, src)
    assert tables["interactions"] == EXPECTED_INTERACTIONS
    assert [(r["title"], r["genres"], r["year"]) for r in tables["items"]] == [
        ('"Great Performances" Cats', "Musical", "1998"),
        ("Café, The", "Comedy, Drama", "1995"),
        ("Heat", "Action, Crime, Thriller", "1995"),
    ]


def test_ml10m_utf8_given_as_the_ratings_file(tmp_path: Path) -> None:
    src = tmp_path / "ml-10m"
    ratings = write(src / "ratings.dat", "1::20::3.5::200\n1::10::5::100\n1::30::0.5::150\n")
    write(src / "movies.dat", "10::Amélie (2001)::Comedy|Romance\n20::Untitled::(no genres listed)\n"
                              "30::Babylon 5 (1994) ::Sci-Fi\n")
    _, tables = run(tmp_path, ratings)
    assert tables["sequences"] == [{"user_id": 0, "items": [0, 2, 1], "ts": [100, 150, 200]}]
    assert [(r["title"], r["genres"], r["year"]) for r in tables["items"]] == [
        ("Amélie", "Comedy, Romance", "2001"), ("Untitled", None, None), ("Babylon 5", "Sci-Fi", "1994")]


def test_ml20m_csv_with_quoted_titles(tmp_path: Path) -> None:
    src = tmp_path / "ml-20m"
    write(src / "ratings.csv", "userId,movieId,rating,timestamp\n7,2,4.0,30\n7,1,3.5,10\n7,3,5.0,20\n")
    write(src / "movies.csv", 'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
                              "2,Heat (1995),Action\n3,Sabrina (1995),Comedy\n")
    _, tables = run(tmp_path, src)
    assert tables["sequences"] == [{"user_id": 0, "items": [0, 2, 1], "ts": [10, 20, 30]}]
    assert tables["items"][0]["title"] == "American President, The"
    assert tables["items"][0]["genres"] == "Comedy, Drama, Romance"


def test_without_movies_file_items_have_no_text(tmp_path: Path) -> None:
    src = tmp_path / "ml-1m"
    write(src / "ratings.dat", U_DATA.replace("\t", "::"))
    result, tables = run(tmp_path, src)
    assert tables["items"][0] == {"item_id": 0, "item_key": "10", "n_interactions": 2}
    assert result["notes"] == ["no movies.dat beside ratings.dat: items have no text (give one with --items)"]


@pytest.mark.parametrize("ratings, message", [
    ("1::10::5::100\n1::20::3\n", "line 2 has 3 fields, expected 4"),
    ("1::10::5::100\n1::20::3::4::5\n", "line 2 has 5 fields, expected 4"),
    ("1::10::5::100\n1::20::five::200\n", "line 2: rating 'five' is not a number"),
    ("1::10::5::100\n1::20::3::200\n1::30::4::\n",
     "line 3 has an empty field; every rating needs user, movie, rating and timestamp"),
])
def test_malformed_ratings_name_the_line(tmp_path: Path, ratings: str, message: str) -> None:
    path = write(tmp_path / "ml" / "ratings.dat", ratings)
    with pytest.raises(DataError, match=exactly(f"{path}: {message}")):
        load(tmp_path / "ml")


def test_malformed_movies_line(tmp_path: Path) -> None:
    write(tmp_path / "ml" / "ratings.dat", "1::10::5::100\n1::20::3::200\n1::30::4::300\n")
    movies = write(tmp_path / "ml" / "movies.dat", "10::Heat (1995)::Action\n20::Sabrina (1995)\n")
    with pytest.raises(DataError, match=exactly(f"{movies}: line 2 has 2 fields, expected 3")):
        run(tmp_path, tmp_path / "ml")


def test_unrecognised_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=exactly(
            f"no MovieLens ratings file (u.data or ratings.dat or ratings.csv) in {tmp_path}")):
        load(tmp_path)
    other = write(tmp_path / "ratings.csv", "user,item\n1,2\n")
    with pytest.raises(DataError, match=exactly(
            f"{other}: not a MovieLens ratings file (first line 'user,item'); expected u.data (tab-separated), "
            "ratings.dat (user::movie::rating::ts) or ratings.csv (userId,movieId,rating,timestamp)")):
        load(other)
    archive = write(tmp_path / "ml-1m.zip", b"PK\x03\x04")
    with pytest.raises(DataError, match=exactly(
            f"{archive} is an archive; unpack it and give the directory with --input")):
        load(archive)
