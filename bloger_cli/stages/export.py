"""`bloger export-ids`: every item's raw key, dense id and semantic ID to Parquet, CSV or JSONL.

The export has one row per item with a semantic ID, in item_id order:

    item_key     the raw id from the source (string)
    item_id      the dense id (int32)
    semantic_id  the codes joined by '-', e.g. "12-200-3-0": stable, and easy to join on in any tool
    codes        list<int16> in Parquet and JSONL; in CSV one int column per level, code_1 .. code_n

`--codebooks FILE` also writes the tokenizer's codebooks, one row per (level, code): level 1..L
(level l holds the vectors of code_l; a disambiguation code has no codebook), code 0..K-1, and vector
list<float32> in Parquet and JSONL, or one float column per dimension, vector_1 .. vector_d, in CSV.
`--compare OLD` reads an earlier export (any of the three formats) and counts, by item_key, the items in
both, those whose semantic_id changed, and the items added and removed.

An export is a user-chosen file, not a workspace artifact: each file goes to a temporary file beside it
and all are renamed into place only once every file is written, so a failed export leaves existing
files as they were. Missing parent directories of the outputs are created.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import duckdb

from bloger_cli import __version__
from bloger_cli.artifacts import SPECS, ArtifactInfo, load_torch
from bloger_cli.config import ExportConfig
from bloger_cli.errors import ArtifactError, ConfigError
from bloger_cli.outputs import OutFile, compare_format, resolve_format, write_files
from bloger_cli.tokenizer.exports import codebook_table, codebook_tensors, compare, id_table
from bloger_cli.workspace import StageContext, StageResult, Workspace, raw_fingerprint, run_stage

log = logging.getLogger(__name__)

# --from -> (semantic IDs kind, tokenizer kind). The training stage will register the "train" kinds in
# artifacts.SPECS with the schemas of semantic_ids / tokenizer; until it does, --from train is refused.
SOURCES = {"tokenize": ("semantic_ids", "tokenizer"), "train": ("trained_semantic_ids", "trained_tokenizer")}


@dataclass(frozen=True)
class _Plan:
    """What run() checked before taking the lock: formats and the input artifacts."""

    out_format: str
    codebooks_format: str | None
    compare_format: str | None
    items: ArtifactInfo
    ids: ArtifactInfo
    tokenizer: ArtifactInfo | None


def run(cfg: ExportConfig, ws: Workspace, *, force: bool = True, lock_timeout: float = 60.0) -> StageResult:
    """Export the workspace's semantic IDs (and optionally codebooks and a comparison); always runs."""
    plan = _plan(cfg, ws)
    inputs = {f"artifact:{info.kind}": info.content_hash for info in (plan.items, plan.ids, plan.tokenizer) if info}
    if cfg.compare is not None:
        inputs[f"file:{cfg.compare.resolve()}"] = raw_fingerprint(cfg.compare)
    return run_stage(ws, "export-ids", cfg, inputs, lambda ctx: _export(ctx, cfg, plan),
                     force=force, lock_timeout=lock_timeout)


def _plan(cfg: ExportConfig, ws: Workspace) -> _Plan:
    out_format = resolve_format(cfg.out, cfg.format, "--out")
    codebooks_format = resolve_format(cfg.codebooks, cfg.format, "--codebooks") if cfg.codebooks else None
    for option, path in (("--out", cfg.out), ("--codebooks", cfg.codebooks)):
        if path is not None and path.is_dir():
            raise ConfigError(f"{option} {path} is a directory", hint=f"give a file name, e.g. {path / 'ids.parquet'}")
    if cfg.codebooks is not None and cfg.codebooks.resolve() == cfg.out.resolve():
        raise ConfigError(f"--out and --codebooks are the same file ({cfg.out})",
                          hint="give --codebooks a file name of its own")
    cmp_format = compare_format(cfg.compare) if cfg.compare is not None else None
    ids_kind, tokenizer_kind = SOURCES[cfg.from_]
    if cfg.from_ == "train" and (ids_kind not in SPECS or not ws.path(ids_kind).is_file()):
        raise ConfigError(f"--from {cfg.from_}: no trained model in {ws.root} yet",
                          hint="run `bloger train-bilevel` first")
    infos = ws.inputs("items", ids_kind, *((tokenizer_kind,) if cfg.codebooks else ()))
    tokenizer = infos.get(tokenizer_kind)
    if tokenizer is not None and tokenizer.config_hash != infos[ids_kind].config_hash:
        raise ArtifactError(f"{tokenizer.path} and {infos[ids_kind].path} come from different "
                            f"`bloger {SPECS[ids_kind].producer}` runs",
                            hint=f"re-run `bloger {SPECS[ids_kind].producer} --force`")
    return _Plan(out_format, codebooks_format, cmp_format, infos["items"], infos[ids_kind], tokenizer)


def _export(ctx: StageContext, cfg: ExportConfig, plan: _Plan) -> dict[str, Any]:
    with duckdb.connect() as con:
        table, notes = id_table(con, plan.items, plan.ids)
        result: dict[str, Any] = {
            "out": str(cfg.out), "format": plan.out_format, "rows": table.num_rows,
            "id_length": table.schema.field("codes").type.list_size,
            "codebooks": str(cfg.codebooks) if cfg.codebooks else None,
        }
        if cfg.compare is not None:
            result.update(compare(con, table, cfg.compare, plan.compare_format))
        files = [OutFile("--out", cfg.out, plan.out_format, table)]
        if cfg.codebooks is not None:
            books = codebook_tensors(load_torch(plan.tokenizer.path, SPECS[plan.tokenizer.kind]), plan.tokenizer.path)
            files.append(OutFile("--codebooks", cfg.codebooks, plan.codebooks_format, codebook_table(books)))
        metadata = {"bloger.version": __version__, "bloger.run_id": ctx.run_id,
                    "bloger.parents": json.dumps(ctx.parents, sort_keys=True)}
        write_files(con, files, metadata)
    log.info("exported %d semantic IDs to %s", table.num_rows, cfg.out)
    return {**result, "notes": notes}


