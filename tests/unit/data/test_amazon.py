"""Amazon importers (2014/2018 `amazon`, 2023 `amazon2023`): hand-written dumps through `prepare.run`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import exactly, import_source

from bloger_cli.config import PrepareConfig
from bloger_cli.errors import DataError
from bloger_cli.stages import prepare
from bloger_cli.workspace import Workspace

ARTIFACTS = ("interactions", "items", "sequences")
HINT_2014 = "expected Amazon 2014/2018 review lines with reviewerID, asin, unixReviewTime"
HINT_2023 = "expected Amazon 2023 review lines with user_id, parent_asin/asin, timestamp"


def run(tmp_path: Path, source: str, input: Path, items: Path | None = None) -> tuple[dict, dict[str, list]]:
    cfg = PrepareConfig(source=source, input=input, items=items, min_user_interactions=1,
                        min_item_interactions=1)
    out = prepare.run(cfg, Workspace(tmp_path / "ws"))
    tables = {name: pq.read_table(tmp_path / "ws" / f"{name}.parquet").to_pylist() for name in ARTIFACTS}
    return out.result, tables


load = import_source  # (source, input, items=None)


def write(path: Path, lines: list[str]) -> Path:
    """One line per entry; `.gz` names are gzipped (stored, no compression: truncation is predictable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data, compresslevel=0, mtime=0) if path.name.endswith(".gz") else data)
    return path


def review(user: str, asin: str, rating: float, ts: int, **extra) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "overall": rating, "unixReviewTime": ts, **extra})


# UA reviews B001, B003, B002 in time order; UB reviews B003 and B002 at the same second (file order wins).
REVIEWS = [
    review("UA", "B002", 5.0, 300, reviewText="great", helpful=[0, 0]),
    review("UB", "B001", 3.0, 100, style={"Size:": " M"}),
    review("UA", "B001", 4.0, 100),
    review("UB", "B003", 2.0, 200, vote="1,234"),
    review("UA", "B003", 1.0, 200),
    review("UB", "B002", 5.0, 200),
]
INTERACTIONS = [
    {"user_id": 0, "item_id": 0, "ts": 100}, {"user_id": 0, "item_id": 2, "ts": 200},
    {"user_id": 0, "item_id": 1, "ts": 300}, {"user_id": 1, "item_id": 0, "ts": 100},
    {"user_id": 1, "item_id": 2, "ts": 200}, {"user_id": 1, "item_id": 1, "ts": 200},
]
SEQUENCES = [{"user_id": 0, "items": [0, 2, 1], "ts": [100, 200, 300]},
             {"user_id": 1, "items": [0, 2, 1], "ts": [100, 200, 200]}]
META_2014 = [  # Python literals, as in the 2014 dumps
    "{'asin': 'B001', 'title': 'Lip Balm', 'price': 3.5, 'related': {'also_bought': ['B002']}, "
    "'brand': 'Acme', 'categories': [['Beauty', 'Lips'], ['Beauty', 'Care']]}",
    "{'asin': 'B999', 'title': 'Never reviewed', 'oops': undefined_name}",  # skipped before parsing
    "{'asin': 'B002', 'description': \"Rosy 'natural' look\", 'categories': [['Beauty']], "
    "'salesRank': {'Beauty': 5}}",
    "{'asin': 'B001', 'title': 'Repeated line: the first one wins'}",
]


def test_2014_directory_gzip_with_python_literal_meta(tmp_path: Path) -> None:
    write(tmp_path / "beauty" / "reviews_Beauty_5.json.gz", REVIEWS)
    write(tmp_path / "beauty" / "meta_Beauty.json.gz", META_2014)
    result, tables = run(tmp_path, "amazon", tmp_path / "beauty")
    assert tables["interactions"] == INTERACTIONS
    assert tables["sequences"] == SEQUENCES
    assert tables["items"] == [
        {"item_id": 0, "item_key": "B001", "n_interactions": 2, "title": "Lip Balm", "brand": "Acme",
         "categories": "Beauty, Lips, Beauty, Care", "description": None, "price": "3.5"},
        {"item_id": 1, "item_key": "B002", "n_interactions": 2, "title": None, "brand": None,
         "categories": "Beauty", "description": "Rosy 'natural' look", "price": None},
        {"item_id": 2, "item_key": "B003", "n_interactions": 2, "title": None, "brand": None,
         "categories": None, "description": None, "price": None},
    ]
    assert result["text_fields"] == ["title", "brand", "categories", "description", "price"]
    assert result["items_without_text"] == 1


def test_2018_file_input_finds_json_meta_by_name(tmp_path: Path) -> None:
    reviews = write(tmp_path / "Musical_Instruments_5.json", REVIEWS)
    write(tmp_path / "meta_Musical_Instruments.json", [
        json.dumps({"category": ["Instruments", ["Guitars", "Strings"]], "description": ["Bright", "steel"],
                    "title": "Strings", "feature": ["6 strings"], "main_cat": "Musical Instruments",
                    "price": "$7.99", "asin": "B001", "also_buy": ["B002"]}),
    ])
    write(tmp_path / "meta_Other.json", [json.dumps({"asin": "B002", "title": "ignored: other category"})])
    result, tables = run(tmp_path, "amazon", reviews)
    assert tables["interactions"] == INTERACTIONS
    assert tables["items"][0] == {
        "item_id": 0, "item_key": "B001", "n_interactions": 2, "title": "Strings",
        "main_category": "Musical Instruments", "categories": "Instruments, Guitars, Strings",
        "features": "6 strings", "description": "Bright, steel", "price": "$7.99"}
    assert tables["items"][1]["title"] is None
    assert result["text_fields"] == ["title", "main_category", "categories", "features", "description", "price"]


def test_items_option_overrides_and_missing_meta_is_a_note(tmp_path: Path) -> None:
    reviews = write(tmp_path / "data" / "reviews_Beauty.json", REVIEWS)
    result, tables = run(tmp_path, "amazon", reviews)
    assert tables["items"][0] == {"item_id": 0, "item_key": "B001", "n_interactions": 2}
    assert result["notes"] == ["no meta_* file beside reviews_Beauty.json: items have no text (give one with --items)"]
    meta = write(tmp_path / "elsewhere.json", ["{'asin': 'B003', 'title': 'Mascara'}"])
    result, tables = run(tmp_path, "amazon", tmp_path / "data", items=meta)
    assert [r["title"] for r in tables["items"]] == [None, None, "Mascara"]


def test_truncated_review_line(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews_Beauty.json", [*REVIEWS[:2], REVIEWS[2][:30]])
    with pytest.raises(DataError, match=exactly(
            f"{path}: line 3 is not valid JSON (Unterminated string starting at: column 30); {HINT_2014}")):
        run(tmp_path, "amazon", path)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews_Beauty.json.gz", REVIEWS)
    data = path.read_bytes()
    path.write_bytes(data[:15 + len(REVIEWS[0]) + len(REVIEWS[1]) + 12])  # header, 2 lines and a bit
    with pytest.raises(DataError, match=exactly(
            f"{path}: the gzip data ends after line 2 (truncated download?); download the file again")):
        load("amazon", path)


def test_missing_review_field(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews_Beauty.json", [REVIEWS[0], json.dumps({"reviewerID": "UC", "asin": "B1"})])
    with pytest.raises(DataError, match=exactly(f"{path}: line 2 has no 'unixReviewTime'; {HINT_2014}")):
        load("amazon", path)
    other = write(tmp_path / "x" / "Beauty_5.json", ['{"user_id": "U1", "parent_asin": "B1", "timestamp": 1}'])
    with pytest.raises(DataError, match=exactly(f"{other}: line 1 has no 'reviewerID'; {HINT_2014}")):
        load("amazon", tmp_path / "x")


def test_malformed_meta_lines(tmp_path: Path) -> None:
    write(tmp_path / "a" / "reviews_Beauty.json", REVIEWS)
    meta = write(tmp_path / "a" / "meta_Beauty.json", [META_2014[0], "{'asin': 'B002', 'title': 'Lip"])
    with pytest.raises(DataError, match=exactly(
            f"{meta}: line 2 is neither JSON nor a Python dict literal (truncated or corrupt line?)")):
        load("amazon", tmp_path / "a")
    meta.write_text('{"title": "x", "asin": "B001"}\n{"title": "y" "asin": "B002"}\n')
    with pytest.raises(DataError, match=exactly(
            f"{meta}: line 2 is not valid JSON (Expecting ',' delimiter: column 15)")):
        load("amazon", tmp_path / "a")
    meta.write_text("{'title': 'no key'}\n")
    with pytest.raises(DataError, match=exactly(f"{meta}: line 1 has no 'asin'; expected Amazon meta_* item lines")):
        load("amazon", tmp_path / "a")


def test_directory_errors(tmp_path: Path) -> None:
    write(tmp_path / "meta_Beauty.json", META_2014)
    with pytest.raises(DataError, match=exactly(
            f"no Amazon 2014/2018 reviews file (*.json or *.json.gz, not meta_*) in {tmp_path}")):
        load("amazon", tmp_path)
    write(tmp_path / "reviews_Beauty.json.gz", REVIEWS)
    write(tmp_path / "reviews_Beauty_5.json.gz", REVIEWS)
    with pytest.raises(DataError, match=exactly(
            f"{tmp_path} holds several Amazon reviews files (reviews_Beauty.json.gz, reviews_Beauty_5.json.gz); "
            "give the file itself with --input")):
        load("amazon", tmp_path)


# ---------------------------------------------------------------------------------------------------
# 2023


def review23(user: str, item: str, rating: float, ts_ms: int, **extra) -> str:
    return json.dumps({"rating": rating, "title": "t", "text": "x", "images": [], "asin": item + "-v",
                       "parent_asin": item, "user_id": user, "timestamp": ts_ms, "helpful_vote": 0,
                       "verified_purchase": True, **extra})


REVIEWS_2023 = [
    review23("UA", "P2", 5.0, 300_999),
    review23("UB", "P1", 3.0, 100_000),
    review23("UA", "P1", 4.0, 100_500),
    json.dumps({"user_id": "UB", "asin": "P3", "rating": 2.0, "timestamp": 200_000}),  # no parent_asin
    review23("UA", "P3", 1.0, 200_000),
    review23("UB", "P2", 5.0, 200_700),
]
META_2023 = [
    json.dumps({"main_category": "All Beauty", "title": "Lip Balm", "average_rating": 4.5, "rating_number": 9,
                "features": ["SPF 15", " "], "description": [], "price": 9.5, "images": [{"large": "u"}],
                "videos": [], "store": "Acme", "categories": [], "details": {"Brand": "Acme", "Weight": "1 oz"},
                "parent_asin": "P1", "bought_together": None}),
    json.dumps({"main_category": None, "title": "Blush", "features": [], "description": ["Rosy", "cheeks"],
                "price": "None", "store": None, "categories": ["Beauty", "Face"], "details": {},
                "parent_asin": "P2"}),
    json.dumps({"title": "Unreviewed", "parent_asin": "P9"}),
]


def test_2023_jsonl_gzip_meta(tmp_path: Path) -> None:
    write(tmp_path / "Beauty_and_Personal_Care.jsonl", REVIEWS_2023)
    write(tmp_path / "meta_Beauty_and_Personal_Care.jsonl.gz", META_2023)
    result, tables = run(tmp_path, "amazon2023", tmp_path)
    assert tables["interactions"] == [
        {"user_id": 0, "item_id": 0, "ts": 100}, {"user_id": 0, "item_id": 2, "ts": 200},
        {"user_id": 0, "item_id": 1, "ts": 300}, {"user_id": 1, "item_id": 0, "ts": 100},
        {"user_id": 1, "item_id": 2, "ts": 200}, {"user_id": 1, "item_id": 1, "ts": 200},
    ]
    assert tables["items"] == [
        {"item_id": 0, "item_key": "P1", "n_interactions": 2, "title": "Lip Balm", "store": "Acme",
         "brand": "Acme", "main_category": "All Beauty", "categories": None, "features": "SPF 15",
         "description": None, "price": "9.5"},
        {"item_id": 1, "item_key": "P2", "n_interactions": 2, "title": "Blush", "store": None, "brand": None,
         "main_category": None, "categories": "Beauty, Face", "features": None, "description": "Rosy, cheeks",
         "price": None},
        {"item_id": 2, "item_key": "P3", "n_interactions": 2, "title": None, "store": None, "brand": None,
         "main_category": None, "categories": None, "features": None, "description": None, "price": None},
    ]
    assert result["text_fields"] == ["title", "store", "brand", "main_category", "categories", "features",
                                     "description", "price"]


def test_2023_bad_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "a" / "Beauty.jsonl", [REVIEWS_2023[0], json.dumps({"user_id": "U", "timestamp": 1})])
    with pytest.raises(DataError, match=exactly(f"{path}: line 2 has no 'parent_asin' or 'asin'; {HINT_2023}")):
        load("amazon2023", path)
    write(tmp_path / "b" / "Beauty.jsonl", REVIEWS_2023)
    meta = write(tmp_path / "b" / "meta_Beauty.jsonl", [META_2023[0], META_2023[1][:40]])
    with pytest.raises(DataError, match=exactly(
            f"{meta}: line 2 is not valid JSON (Expecting ',' delimiter: column 41); "
            "expected Amazon 2023 meta lines with parent_asin")):
        load("amazon2023", tmp_path / "b")
