"""Artifact specs and the one Parquet I/O layer: atomic writes with metadata, schema-checked reads.

Every artifact is a Parquet file in the workspace whose footer carries key-value metadata:
``bloger.kind``, ``bloger.schema_version``, ``bloger.config_hash``, ``bloger.parents`` (JSON: parent
kind -> content hash), ``bloger.version`` and ``bloger.meta`` (JSON, stage-specific). Writers produce a
temporary file in the destination directory; the stage runner renames it into place on success.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from bloger_cli import __version__
from bloger_cli.errors import ArtifactError, DamagedFile, WriteFailed

SCHEMA_VERSION_KEY = "bloger.schema_version"
RUN_STAGES = frozenset({"train-bilevel", "evaluate", "baseline"})  # their outputs live per run
ANY_SIZE = 0  # a fixed_size_list of this size in a spec accepts any width (embedding dimension, ID length)


@dataclass(frozen=True)
class ArtifactSpec:
    """What an artifact must look like: required columns and types, and which stage writes it."""

    kind: str
    filename: str
    schema: pa.Schema
    producer: str
    version: int = 1
    extra_type: pa.DataType | None = None  # type every further column must have (None: no extras)
    format: str = "parquet"  # or "torch": a checkpoint dict {"metadata", "config", "state_dict", ...}

    def missing_hint(self) -> str:
        return f"run `bloger {self.producer}` first"

    @property
    def per_run(self) -> bool:
        """Whether each run of a workspace has its own artifact of this kind (runs/NAME/...), or the
        workspace has one, shared by its runs (the data, embeddings and tokenizer)."""
        return self.producer in RUN_STAGES


SPECS: dict[str, ArtifactSpec] = {
    spec.kind: spec
    for spec in (
        ArtifactSpec(
            "interactions", "interactions.parquet",
            pa.schema([("user_id", pa.int32()), ("item_id", pa.int32()), ("ts", pa.int64())]),
            producer="prepare",
        ),
        ArtifactSpec(
            "users", "users.parquet",
            pa.schema([("user_id", pa.int32()), ("user_key", pa.string()), ("n_interactions", pa.int32())]),
            producer="prepare",
        ),
        ArtifactSpec(
            "items", "items.parquet",
            pa.schema([("item_id", pa.int32()), ("item_key", pa.string()), ("n_interactions", pa.int32())]),
            producer="prepare",
            extra_type=pa.string(),  # the item's text fields (title, brand, ...)
        ),
        ArtifactSpec(
            "sequences", "sequences.parquet",
            pa.schema([("user_id", pa.int32()), ("items", pa.list_(pa.int32())), ("ts", pa.list_(pa.int64()))]),
            producer="prepare",
        ),
        ArtifactSpec(
            "embeddings", "embeddings.parquet",
            pa.schema([("item_id", pa.int32()), ("embedding", pa.list_(pa.float32(), ANY_SIZE))]),
            producer="embed",
        ),
        ArtifactSpec(
            "semantic_ids", "semantic_ids.parquet",
            pa.schema([("item_id", pa.int32()), ("codes", pa.list_(pa.int16(), ANY_SIZE))]),
            producer="tokenize",
        ),
        ArtifactSpec(
            "codebook_stats", "codebook_stats.parquet",
            pa.schema([("level", pa.int32()), ("codes_used", pa.int32()), ("density", pa.float64()),
                       ("entropy_bits", pa.float64()), ("collision_rate", pa.float64()),
                       ("quantization_error", pa.float64())]),
            producer="tokenize",
        ),
        ArtifactSpec("tokenizer", "tokenizer.pt", pa.schema([]), producer="tokenize", format="torch"),
        # train-bilevel: the recommender checkpoints, the per-epoch history, and the semantic IDs and
        # tokenizer the trained model decodes with (equal to tokenize's in mode fixed).
        ArtifactSpec("checkpoint", "best.pt", pa.schema([]), producer="train-bilevel", format="torch"),
        ArtifactSpec("last_checkpoint", "last.pt", pa.schema([]), producer="train-bilevel", format="torch"),
        ArtifactSpec(
            "history", "history.parquet",
            pa.schema([("event", pa.string()), ("epoch", pa.int32()), ("step", pa.int64()), ("lr", pa.float64()),
                       ("train_loss", pa.float64()), ("val_recall_10", pa.float64()),
                       ("val_ndcg_10", pa.float64()), ("seconds", pa.float64()),
                       ("samples_per_s", pa.float64())]),
            producer="train-bilevel",
            # event "epoch" (one per epoch) or "tokenizer_update" (bilevel: one per meta step, with the
            # losses, codebook statistics, and per tokenizer tensor cos/NAME and surgery/NAME as 0/1)
            extra_type=pa.float64(),
        ),
        ArtifactSpec(
            "trained_semantic_ids", "trained_semantic_ids.parquet",
            pa.schema([("item_id", pa.int32()), ("codes", pa.list_(pa.int16(), ANY_SIZE))]),
            producer="train-bilevel",
        ),
        ArtifactSpec("trained_tokenizer", "trained_tokenizer.pt", pa.schema([]), producer="train-bilevel",
                     format="torch"),
        ArtifactSpec(
            "metrics", "metrics.parquet",
            pa.schema([("run_id", pa.string()), ("split", pa.string()), ("method", pa.string()),
                       ("metric", pa.string()), ("k", pa.int32()), ("value", pa.float64()),
                       ("n_users", pa.int32())]),
            producer="evaluate",
        ),
        # baseline: SASRec's best weights and per-epoch history (the history schema), and the test metrics
        # of the latest run of each baseline model (method = the model name)
        ArtifactSpec("baseline_checkpoint", "baseline.pt", pa.schema([]), producer="baseline", format="torch"),
        ArtifactSpec(
            "baseline_history", "baseline_history.parquet",
            pa.schema([("event", pa.string()), ("epoch", pa.int32()), ("step", pa.int64()), ("lr", pa.float64()),
                       ("train_loss", pa.float64()), ("val_recall_10", pa.float64()),
                       ("val_ndcg_10", pa.float64()), ("seconds", pa.float64()),
                       ("samples_per_s", pa.float64())]),
            producer="baseline",
        ),
        ArtifactSpec(
            "baseline_metrics", "baseline_metrics.parquet",
            pa.schema([("run_id", pa.string()), ("split", pa.string()), ("method", pa.string()),
                       ("metric", pa.string()), ("k", pa.int32()), ("value", pa.float64()),
                       ("n_users", pa.int32())]),
            producer="baseline",
        ),
    )
}


@dataclass
class ArtifactInfo:
    """An artifact file as found on disk: its metadata and content hash."""

    kind: str
    path: Path
    rows: int
    config_hash: str
    parents: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores list item names and nullability (DuckDB and pyarrow name them differently)."""
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _same_type(
            actual.value_type, expected.value_type
        )
    if pa.types.is_fixed_size_list(expected):
        return (
            pa.types.is_fixed_size_list(actual)
            and expected.list_size in (ANY_SIZE, actual.list_size)
            and _same_type(actual.value_type, expected.value_type)
        )
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return actual == expected


def check_schema(path: Path, schema: pa.Schema, spec: ArtifactSpec) -> None:
    """Raise ArtifactError naming the file, the column, and the expected vs actual types."""
    fix = f"re-run `bloger {spec.producer} --force`"
    actual = {f.name: f.type for f in schema}
    for expected in spec.schema:
        if expected.name not in actual:
            raise DamagedFile(
                f"{path}: missing column {expected.name!r} (expected {expected.type}); "
                f"columns are {', '.join(actual) or 'none'}",
                hint=fix,
            )
        if not _same_type(actual[expected.name], expected.type):
            raise DamagedFile(
                f"{path}: column {expected.name!r} has type {actual[expected.name]}, expected {expected.type}",
                hint=fix,
            )
    for name, dtype in actual.items():
        if name in spec.schema.names:
            continue
        if spec.extra_type is None or not _same_type(dtype, spec.extra_type):
            allowed = f"extra columns must be {spec.extra_type}" if spec.extra_type else "no extra columns allowed"
            raise DamagedFile(f"{path}: unexpected column {name!r} of type {dtype} ({allowed})", hint=fix)


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, streamed (the identity lineage is tracked by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def make_metadata(spec: ArtifactSpec, config_hash: str, parents: dict[str, str],
                  meta: dict[str, Any] | None = None) -> dict[str, str]:
    """The key-value metadata written into every artifact's footer."""
    return {
        "bloger.kind": spec.kind,
        SCHEMA_VERSION_KEY: str(spec.version),
        "bloger.config_hash": config_hash,
        "bloger.parents": json.dumps(parents, sort_keys=True),
        "bloger.version": __version__,
        "bloger.meta": json.dumps(meta or {}, sort_keys=True),
    }


def read_info(path: Path, spec: ArtifactSpec, *, with_hash: bool = False) -> ArtifactInfo:
    """Read an artifact's footer, checking kind, schema version and columns."""
    if not path.is_file():
        raise ArtifactError(f"no {spec.kind} artifact at {path}", hint=spec.missing_hint())
    if spec.format == "torch":
        return _torch_info(path, spec, with_hash)
    try:
        md = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DamagedFile(f"{path} is not a readable Parquet file ({exc})",
                            hint=f"re-run `bloger {spec.producer} --force`") from None
    kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    _check_kv(path, spec, kv)
    check_schema(path, md.schema.to_arrow_schema(), spec)
    return _info(path, spec, kv, md.num_rows, with_hash)


def _check_kv(path: Path, spec: ArtifactSpec, kv: dict[str, str]) -> None:
    fix = f"re-run `bloger {spec.producer} --force`"
    if kv.get("bloger.kind") != spec.kind:
        raise DamagedFile(f"{path} is not a bloger {spec.kind} artifact (kind {kv.get('bloger.kind')!r})",
                            hint=fix)
    if kv.get(SCHEMA_VERSION_KEY) != str(spec.version):
        raise DamagedFile(
            f"{path} has schema version {kv.get(SCHEMA_VERSION_KEY)}, this bloger reads version {spec.version}",
            hint=fix,
        )


def _info(path: Path, spec: ArtifactSpec, kv: dict[str, str], rows: int, with_hash: bool) -> ArtifactInfo:
    return ArtifactInfo(
        kind=spec.kind, path=path, rows=rows, config_hash=kv.get("bloger.config_hash", ""),
        parents=json.loads(kv.get("bloger.parents", "{}")), meta=json.loads(kv.get("bloger.meta", "{}")),
        content_hash=file_hash(path) if with_hash else "",
    )


def load_torch(path: Path, spec: ArtifactSpec) -> dict[str, Any]:
    """Load a checkpoint artifact (tensors and plain values only: never a pickled module)."""
    import torch

    if not path.is_file():
        raise ArtifactError(f"no {spec.kind} artifact at {path}", hint=spec.missing_hint())
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # torch's run over many lines
        raise DamagedFile(f"{path} is not a readable checkpoint ({type(exc).__name__}: {reason})",
                            hint=f"re-run `bloger {spec.producer} --force`") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("metadata"), dict):
        raise DamagedFile(f"{path} is not a bloger {spec.kind} checkpoint (no metadata)",
                            hint=f"re-run `bloger {spec.producer} --force`")
    _check_kv(path, spec, ckpt["metadata"])
    return ckpt


def _torch_info(path: Path, spec: ArtifactSpec, with_hash: bool) -> ArtifactInfo:
    ckpt = load_torch(path, spec)
    return _info(path, spec, ckpt["metadata"], int(ckpt.get("rows", 0)), with_hash)


def save_torch(ckpt: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """Save a checkpoint dict with the artifact metadata (the caller picks a temporary path)."""
    import torch

    with writing(path, RuntimeError):  # torch reports a failed write as a RuntimeError, without errno
        torch.save({**ckpt, "metadata": metadata}, path)


def write_arrow(table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    """Write an Arrow table with footer metadata (the caller picks a temporary path)."""
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata({**existing, **{k.encode(): v.encode() for k, v in metadata.items()}})
    with writing(path):
        pq.write_table(table, path, compression="zstd")


def copy_query(con: duckdb.DuckDBPyConnection, query: str, path: Path, metadata: dict[str, str]) -> None:
    """Let DuckDB write a query's result straight to Parquet with footer metadata (no Python rows)."""
    kv = ", ".join(f"'{k}': '{sql_str(v)}'" for k, v in metadata.items())
    with writing(path, duckdb.IOException):
        con.execute(f"COPY ({query}) TO '{sql_str(str(path))}' "
                    f"(FORMAT parquet, COMPRESSION zstd, KV_METADATA {{{kv}}})")


TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # temp_path_for's names


@contextmanager
def writing(path: Path, *also: type[Exception]) -> Iterator[None]:
    """A write of `path` that fails midway (disk full, a file size limit, a read-only place) removes the
    partial file and raises WriteFailed naming the file it was for; `also`: a writer's own exception
    types for a failed write."""
    failures: tuple[type[Exception], ...] = (OSError, *also)
    try:
        yield
    except failures as exc:
        path.unlink(missing_ok=True)
        match = TEMP_NAME.match(path.name)
        target = path.with_name(match["name"]) if match else path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise WriteFailed(f"cannot write {target}: {reason}" + (" (disk full?)" if full else ""),
                          hint="free space or make the place writable, then run the command again; earlier "
                               "artifacts are as they were") from None


def sql_str(text: str) -> str:
    """Text for inside a SQL string literal (quotes doubled)."""
    return text.replace("'", "''")


def sql_literal(value: object) -> str:
    """A SQL string literal of a path or text: 'it''s'."""
    return "'" + sql_str(str(value)) + "'"


def temp_path_for(final: Path) -> Path:
    """A temporary file beside `final` (same filesystem, so the rename is atomic)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def read_table(path: Path, spec: ArtifactSpec, columns: list[str] | None = None) -> pa.Table:
    """Read an artifact after checking its footer."""
    read_info(path, spec)
    return pq.read_table(path, columns=columns)
