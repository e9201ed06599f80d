"""The importers by source name: each a pair (find and check the source's files, load them into the
DuckDB table `raw` and `raw_items`)."""

from __future__ import annotations

from bloger_cli.config import PrepareConfig
from bloger_cli.data import amazon, movielens, sources, synthetic
from bloger_cli.data.sources import Importer, SourceFiles
from bloger_cli.errors import ConfigError

SOURCES: dict[str, Importer] = {
    "letter": (sources.letter_files, sources.load_letter),
    "amazon": (amazon.amazon_files, amazon.load_amazon),
    "amazon2023": (amazon.amazon2023_files, amazon.load_amazon2023),
    "movielens": (movielens.movielens_files, movielens.load_movielens),
    "recbole": (sources.recbole_files, sources.load_recbole),
    "table": (sources.table_files, sources.load_table),
    "synthetic": (synthetic.synthetic_files, synthetic.load_synthetic),
}


def resolve_source(cfg: PrepareConfig) -> SourceFiles:
    """Find and check the source's files before anything is written."""
    files_fn, _ = importer(cfg.source)
    return files_fn(cfg)


def importer(source: str) -> Importer:
    if source not in SOURCES:  # the config's Literal makes this an internal error
        raise ConfigError(f"unknown source {source!r}; choose from {', '.join(sorted(SOURCES))}")
    return SOURCES[source]
