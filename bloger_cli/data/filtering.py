"""From raw interactions to the prepared tables, in DuckDB SQL: drop rows with missing keys, rating
threshold, duplicate policy, iterative k-core to a fixed point, users too short for leave-one-out, an
optional seeded user sample, dense re-indexing (numeric keys in numeric order), and the summary of
what is left. Tables: `raw` (the importer's) -> `t` -> `user_map`, `item_map`, `inter`.
"""

from __future__ import annotations

import logging
from typing import Any

import duckdb

from bloger_cli.config import PrepareConfig
from bloger_cli.data.sources import SourceFiles, SourceInfo, one_row, quote_ident
from bloger_cli.data.splits import MIN_SEQUENCE, sample_counts
from bloger_cli.errors import ConfigError, DataError
from bloger_cli.progress import Steps

log = logging.getLogger(__name__)


def count_rows(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(one_row(con, sql)[0])


def filter_interactions(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, info: SourceInfo, files: SourceFiles,
            steps: Steps) -> list[dict[str, Any]]:
    """Filter table `raw` into table `t` (missing keys, rating, repeats, k-core, sample); returns the rows
    removed per step."""
    where = files.interactions[0] if files.interactions else "the synthetic source"
    total = count_rows(con, "SELECT count(*) FROM raw")
    if total == 0:
        raise DataError(f"{where}: no interactions found")
    log_rows: list[dict[str, Any]] = []

    def record(step: str, before: int) -> int:
        after = count_rows(con, "SELECT count(*) FROM t")
        log_rows.append({"step": step, "removed": before - after, "remaining": after})
        log.info("%s: removed %d rows, %d remain", step, before - after, after)
        return after

    con.execute("CREATE OR REPLACE TABLE t AS SELECT * FROM raw WHERE user_key IS NOT NULL AND "
                "trim(user_key) <> '' AND item_key IS NOT NULL AND trim(item_key) <> ''")
    con.execute("DROP TABLE raw")
    n = record("missing user or item key", total)
    if cfg.min_rating is not None:
        if not info.has_rating:
            raise ConfigError(f"min_rating is set ({cfg.min_rating}) but source {cfg.source!r} has no ratings",
                              hint="drop --min-rating or map --rating-col")
        con.execute(f"DELETE FROM t WHERE rating IS NULL OR rating < {float(cfg.min_rating)!r}")
        n = record(f"rating below {cfg.min_rating:g}", n)
    if cfg.duplicates == "first":
        _drop_repeats(con)
        n = record("repeated (user, item): kept the first", n)
    steps.step("k-core filtering")
    kcore(con, cfg.min_user_interactions, cfg.min_item_interactions, steps)
    n = record(f"k-core (users >= {cfg.min_user_interactions}, items >= {cfg.min_item_interactions})", n)
    if cfg.min_user_interactions < MIN_SEQUENCE:
        kcore(con, MIN_SEQUENCE, cfg.min_item_interactions, steps)
        n = record(f"users with < {MIN_SEQUENCE} interactions (cannot be split)", n)
    if cfg.sample_users is not None:
        # a seeded sample of whole users (hash order, no RNG state): a smaller experiment on the same data
        con.execute(f"DELETE FROM t WHERE user_key NOT IN (SELECT user_key FROM (SELECT DISTINCT user_key FROM t) "
                    f"ORDER BY hash(user_key || '/{int(cfg.sample_seed)}'), user_key LIMIT {int(cfg.sample_users)})")
        n = record(f"users outside a sample of {cfg.sample_users} (seed {cfg.sample_seed})", n)
    if n == 0:
        dropped = "; ".join(f"{r['step']}: -{r['removed']}" for r in log_rows if r["removed"])
        raise DataError(
            f"{where}: no interactions left after filtering ({total} read; {dropped})",
            hint="lower --min-user-interactions / --min-item-interactions or --min-rating",
        )
    return log_rows


def _drop_repeats(con: duckdb.DuckDBPyConnection) -> None:
    """Keep each (user, item)'s first row (by ts, NULLs last, then ord); delete the other rows of `t`.

    Only the pairs that occur more than once go through the window (usually few), not the whole table.
    """
    con.execute(
        "DELETE FROM t WHERE rowid IN (SELECT t.rowid FROM t SEMI JOIN (SELECT user_key, item_key FROM t "
        "GROUP BY ALL HAVING count(*) > 1) USING (user_key, item_key) QUALIFY row_number() OVER "
        "(PARTITION BY user_key, item_key ORDER BY ts NULLS LAST, ord) > 1)"
    )


def kcore(con: duckdb.DuckDBPyConnection, min_user: int, min_item: int, steps: Steps) -> None:
    """Remove users and items below their thresholds until nothing changes (the k-core is unique).

    Each iteration drops, at once, the rows of every user and item below its threshold, counted on the
    rows left by the previous iteration. The loop runs on `kc(r, u, i)`, integer ids plus the row's
    rowid in `t` (16 bytes a row instead of the string keys), deleting rows in place; the rows left out
    of the core are deleted from `t` once at the end (the artifacts' order comes from their own ORDER BY).
    """
    for kind in ("user", "item"):
        con.execute(f"CREATE OR REPLACE TEMP TABLE kc_{kind} AS SELECT {kind}_key, "
                    f"(row_number() OVER ())::INTEGER AS id FROM (SELECT DISTINCT {kind}_key FROM t)")
    con.execute("CREATE OR REPLACE TEMP TABLE kc AS SELECT t.rowid AS r, u.id AS u, i.id AS i FROM t "
                "JOIN kc_user u USING (user_key) JOIN kc_item i USING (item_key)")
    con.execute("DROP TABLE kc_user; DROP TABLE kc_item")
    start = after = count_rows(con, "SELECT count(*) FROM kc")
    for iteration in range(1, 10_000):
        before = after
        con.execute(
            f"DELETE FROM kc WHERE u IN (SELECT u FROM kc GROUP BY u HAVING count(*) < {int(min_user)}) "
            f"OR i IN (SELECT i FROM kc GROUP BY i HAVING count(*) < {int(min_item)})"
        )
        after = count_rows(con, "SELECT count(*) FROM kc")
        steps.step(f"k-core iteration {iteration}: {after:,} interactions")
        if after == before:
            break
    if after < start:
        con.execute("DELETE FROM t WHERE rowid NOT IN (SELECT r FROM kc)")
    con.execute("DROP TABLE kc")


def reindex(con: duckdb.DuckDBPyConnection) -> None:
    """Dense ids from 0: numeric keys in numeric order, then the others in string order."""
    for kind in ("user", "item"):
        con.execute(
            f"CREATE OR REPLACE TABLE {kind}_map AS SELECT {kind}_key, "
            f"(row_number() OVER (ORDER BY TRY_CAST({kind}_key AS HUGEINT) NULLS LAST, {kind}_key) - 1)::INTEGER "
            f"AS {kind}_id, n::INTEGER AS n_interactions FROM (SELECT {kind}_key, count(*) AS n FROM t GROUP BY 1)"
        )
    con.execute(
        "CREATE OR REPLACE TABLE inter AS SELECT u.user_id, i.item_id, "
        "COALESCE(t.ts, t.ord)::BIGINT AS ts, t.ord FROM t JOIN user_map u USING (user_key) "
        "JOIN item_map i USING (item_key)"
    )
    con.execute("DROP TABLE t")


def summarize(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, info: SourceInfo,
              removed: list[dict[str, Any]]) -> dict[str, Any]:
    """What the prepared data holds: sizes, sparsity, sequence lengths, samples per split, text coverage."""
    users, items, inter = (count_rows(con, f"SELECT count(*) FROM {t}") for t in ("user_map", "item_map", "inter"))
    lengths = "(SELECT n_interactions AS n FROM user_map)"
    avg, median, lo, hi = one_row(con, f"SELECT avg(n), median(n), min(n), max(n) FROM {lengths}")
    train, valid, test = one_row(con, sample_counts(lengths))
    no_text = items
    if info.text_fields:
        filled = " OR ".join(f"nullif(trim(r.{quote_ident(f)}), '') IS NOT NULL" for f in info.text_fields)
        no_text = count_rows(con, f"SELECT count(*) FROM item_map m WHERE NOT EXISTS (SELECT 1 FROM raw_items r "
                              f"WHERE r.item_key = m.item_key AND ({filled}))")
    return {
        "source": cfg.source,
        "users": users, "items": items, "interactions": inter,
        "sparsity": 1.0 - inter / (users * items),
        "avg_sequence_length": float(avg), "median_sequence_length": float(median),
        "min_sequence_length": int(lo), "max_sequence_length": int(hi),
        "samples": {"train": int(train), "valid": int(valid), "test": int(test)},
        "max_history": cfg.max_history,
        "text_fields": info.text_fields, "items_without_text": no_text,
        "steps": removed, "notes": info.notes,
    }
