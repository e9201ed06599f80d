"""`bloger prepare`: raw interactions -> interactions, users, items and sequences artifacts.

The importer of the source (data/importers.py) loads the raw rows into DuckDB; data/filtering.py
filters and re-indexes them in SQL; this stage writes the four artifacts, in chronological order with
the input order as the tie-break.
"""

from __future__ import annotations

import logging
from typing import Any

import duckdb

from bloger_cli.artifacts import copy_query
from bloger_cli.config import PrepareConfig
from bloger_cli.data.filtering import filter_interactions, reindex, summarize
from bloger_cli.data.importers import importer, resolve_source
from bloger_cli.data.sources import SourceFiles, SourceInfo, quote_ident, sql_literal
from bloger_cli.progress import Steps
from bloger_cli.workspace import StageContext, StageResult, Workspace, raw_fingerprint, run_stage

log = logging.getLogger(__name__)

def run(cfg: PrepareConfig, ws: Workspace, *, force: bool = False, lock_timeout: float = 60.0) -> StageResult:
    """Run the prepare stage on a workspace (a no-op when inputs and config are unchanged)."""
    files = resolve_source(cfg)
    inputs = {f"file:{p.resolve()}": raw_fingerprint(p) for p in files.all()}
    return run_stage(ws, "prepare", cfg, inputs, lambda ctx: _prepare(ctx, cfg, files),
                     force=force, lock_timeout=lock_timeout)


def _prepare(ctx: StageContext, cfg: PrepareConfig, files: SourceFiles) -> dict[str, Any]:
    con = duckdb.connect()
    try:
        spill = ctx.workspace.root / ".duckdb-tmp"
        con.execute(f"SET temp_directory = {sql_literal(str(spill))}")
        con.execute("SET preserve_insertion_order = true")
        with Steps("prepare") as steps:
            steps.step(f"reading {cfg.source} source")
            info = importer(cfg.source)[1](con, cfg, files)
            removed = filter_interactions(con, cfg, info, files, steps)
            steps.step("re-indexing and writing artifacts")
            reindex(con)
            _write(con, ctx, cfg, info)
            summary = summarize(con, cfg, info, removed)
        return summary
    finally:
        con.close()


def _write(con: duckdb.DuckDBPyConnection, ctx: StageContext, cfg: PrepareConfig, info: SourceInfo) -> None:
    meta = {"source": cfg.source, "text_fields": info.text_fields, "max_history": cfg.max_history,
            "has_time": info.has_time}
    copy_query(con, "SELECT user_id, item_id, ts FROM inter ORDER BY user_id, ts, ord",
               ctx.output("interactions"), ctx.metadata("interactions", meta))
    copy_query(con, "SELECT user_id, user_key, n_interactions FROM user_map ORDER BY user_id",
               ctx.output("users"), ctx.metadata("users", meta))
    texts = "".join(f", r.{quote_ident(f)}::VARCHAR AS {quote_ident(f)}" for f in info.text_fields)
    copy_query(
        con,
        f"SELECT m.item_id, m.item_key, m.n_interactions{texts} FROM item_map m LEFT JOIN "
        f"(SELECT * FROM raw_items QUALIFY row_number() OVER (PARTITION BY item_key) = 1) r "
        f"USING (item_key) ORDER BY m.item_id",
        ctx.output("items"), ctx.metadata("items", meta),
    )
    # One plain list of (ts, ord, item) per user, sorted afterwards: about twice as fast at 10^7 rows as
    # two ordered aggregates, list(item_id ORDER BY ts, ord) and list(ts ORDER BY ts, ord).
    copy_query(
        con,
        "SELECT user_id, [x.item_id FOR x IN s] AS items, [x.ts FOR x IN s] AS ts FROM (SELECT user_id, "
        "list_sort(list(struct_pack(ts := ts, ord := ord, item_id := item_id))) AS s FROM inter GROUP BY user_id) "
        "ORDER BY user_id",
        ctx.output("sequences"), ctx.metadata("sequences", meta),
    )


