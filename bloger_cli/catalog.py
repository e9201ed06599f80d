"""The workspace catalog: a DuckDB file recording every stage run and every artifact it wrote.

Connections are short-lived (open, write, close) so that `bloger status` can read while a stage runs;
stage runs themselves are serialised by the workspace lock, not by DuckDB.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from bloger_cli import __version__
from bloger_cli.artifacts import SPECS, ArtifactInfo
from bloger_cli.errors import DamagedFile, WorkspaceBusy, WorkspaceError

log = logging.getLogger(__name__)

# The catalog's own format: bump it when a change of the tables would mislead an older bloger, which then
# refuses the file instead of misreading it. Catalogs from before the format table count as format 1.
CATALOG_FORMAT = 1
# A catalog is never a reason to download anything: DuckDB would fetch an extension to open a SQLite file.
_NO_EXTENSIONS: dict[str, str | bool | int | float | list[str]] = {"autoinstall_known_extensions": False,
                                                                  "autoload_known_extensions": False}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, stage VARCHAR NOT NULL, status VARCHAR NOT NULL,
    config JSON, config_hash VARCHAR, fingerprint VARCHAR, inputs JSON,
    started_at TIMESTAMP, finished_at TIMESTAMP, result JSON, error VARCHAR, bloger_version VARCHAR
);
CREATE TABLE IF NOT EXISTS artifacts (
    kind VARCHAR NOT NULL, path VARCHAR NOT NULL, schema_version INTEGER, config_hash VARCHAR,
    content_hash VARCHAR, parents JSON, rows BIGINT, bloger_version VARCHAR,
    created_at TIMESTAMP, run_id VARCHAR, current BOOLEAN
);
ALTER TABLE runs ADD COLUMN IF NOT EXISTS run_name VARCHAR;
ALTER TABLE artifacts ADD COLUMN IF NOT EXISTS run_name VARCHAR;
"""
# run_name: the --run NAME a stage ran under (NULL: the workspace's unnamed run, as every run before
# runs were named). Artifacts of per-run kinds are current per (kind, run_name); shared kinds per kind.

ANY_RUN = object()  # runs(): every run name


@dataclass
class RunRecord:
    run_id: str
    stage: str
    status: str
    config: dict[str, Any]
    config_hash: str
    fingerprint: str
    inputs: dict[str, str]
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any]
    error: str | None
    run_name: str | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored as UTC


class Catalog:
    """Records runs and artifacts of one workspace in `catalog.duckdb`."""

    def __init__(self, path: Path, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short connection; retries while another process has the file open for writing."""
        if read_only and not self.path.exists():
            raise WorkspaceError(f"{self.path.parent} is not a bloger workspace (no catalog.duckdb)",
                                 hint="run `bloger prepare` there first")
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only, config=_NO_EXTENSIONS)
                break
            except duckdb.Error as exc:
                if "lock" not in str(exc).lower():
                    raise self._unreadable(exc) from None
                if time.monotonic() > deadline:
                    raise WorkspaceBusy(f"cannot open {self.path}: {exc}") from None
                time.sleep(0.1)
        try:
            self._check_format(con, read_only)
            if not read_only:
                con.execute(_SCHEMA)
            yield con
        finally:
            con.close()

    def _unreadable(self, exc: Exception) -> Exception:
        """The error for a catalog DuckDB cannot open: another kind of file, or a newer DuckDB's."""
        first = str(exc).splitlines()[0]
        if "version" in first.lower():
            return WorkspaceError(f"{self.path} was written by a newer DuckDB ({first})",
                                  hint="upgrade bloger (pip install -U bloger)")
        return DamagedFile(f"{self.path} is not a bloger catalog (not a DuckDB database)",
                           hint="move it away and re-run the stages from `bloger prepare`")

    def _check_format(self, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        """Refuse a catalog of a newer format before reading or writing it; stamp a new one."""
        known = _scalar(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'bloger_catalog'")
        found = _scalar(con, "SELECT max(format) FROM bloger_catalog") if known else None
        if found is not None and found > CATALOG_FORMAT:
            raise WorkspaceError(f"{self.path} has catalog format {found}, this bloger reads format "
                                 f"{CATALOG_FORMAT} or older", hint="upgrade bloger (pip install -U bloger)")
        if found is None and not read_only:
            con.execute("CREATE TABLE IF NOT EXISTS bloger_catalog (format INTEGER NOT NULL)")
            con.execute("INSERT INTO bloger_catalog VALUES (?)", [CATALOG_FORMAT])

    def start_run(self, stage: str, config: dict[str, Any], config_hash: str, fingerprint: str,
                  inputs: dict[str, str], run_name: str | None = None) -> str:
        run_id = f"{stage}-{_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        with self.connect() as con:
            con.execute(
                "INSERT INTO runs (run_id, stage, status, config, config_hash, fingerprint, inputs, started_at, "
                "bloger_version, run_name) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                [run_id, stage, json.dumps(config), config_hash, fingerprint, json.dumps(inputs), _now(),
                 __version__, run_name],
            )
        return run_id

    def finish_run(self, run_id: str, status: str, result: dict[str, Any] | None = None,
                   error: str | None = None, artifacts: Sequence[ArtifactInfo] = (),
                   run_name: str | None = None) -> None:
        """Close a run; on success register its artifacts as the current ones of their kinds (per run
        name for the kinds each run has its own of)."""
        root = self.path.parent
        with self.connect() as con:
            con.execute("BEGIN")
            for info in artifacts:
                name = run_name if SPECS[info.kind].per_run else None
                con.execute("UPDATE artifacts SET current = false WHERE kind = ? AND run_name IS NOT DISTINCT FROM ?",
                            [info.kind, name])
                con.execute(
                    "INSERT INTO artifacts (kind, path, schema_version, config_hash, content_hash, parents, rows, "
                    "bloger_version, created_at, run_id, current, run_name) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, true, ?)",
                    [info.kind, _relative(info.path, root), SPECS[info.kind].version, info.config_hash,
                     info.content_hash, json.dumps(info.parents), info.rows, __version__, _now(), run_id, name],
                )
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, result = ?, error = ? WHERE run_id = ?",
                [status, _now(), json.dumps(result) if result is not None else None, error, run_id],
            )
            con.execute("COMMIT")

    def current_artifacts(self, run_name: str | None = None) -> dict[str, dict[str, Any]]:
        """kind -> the current artifact's catalog row: the shared kinds, and the run's own kinds of the
        run `run_name` (None: the unnamed run)."""
        if not self.path.exists():
            return {}
        with self.connect(read_only=True) as con:
            if not _has_column(con, "artifacts", "run_name"):  # a catalog older than named runs
                cur = con.execute("SELECT *, NULL AS run_name FROM artifacts WHERE current ORDER BY kind")
            else:
                cur = con.execute("SELECT * FROM artifacts WHERE current ORDER BY kind")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, row)) for row in cur.fetchall()]
        return {row["kind"]: row for row in rows
                if row["kind"] not in SPECS or not SPECS[row["kind"]].per_run or row["run_name"] == run_name}

    def runs(self, stage: str | None = None, status: str | None = None, run_name: Any = ANY_RUN) -> list[RunRecord]:
        """Runs, newest first, optionally filtered by stage, status and run name (None: the unnamed run)."""
        if not self.path.exists():
            return []
        with self.connect(read_only=True) as con:
            name = "run_name" if _has_column(con, "runs", "run_name") else "NULL"
            rows = con.execute(
                "SELECT run_id, stage, status, config, config_hash, fingerprint, inputs, started_at, "
                f"finished_at, result, error, {name} FROM runs WHERE (? IS NULL OR stage = ?) "
                "AND (? IS NULL OR status = ?) ORDER BY started_at DESC",
                [stage, stage, status, status],
            ).fetchall()
        records = [
            RunRecord(r[0], r[1], r[2], json.loads(r[3] or "{}"), r[4], r[5], json.loads(r[6] or "{}"),
                      r[7], r[8], json.loads(r[9]) if r[9] else {}, r[10], r[11])
            for r in rows
        ]
        return records if run_name is ANY_RUN else [r for r in records if r.run_name == run_name]

    def run_names(self, stage: str = "train-bilevel") -> list[str | None]:
        """The names of the runs with a finished `stage`, newest first (None: the unnamed run)."""
        names: list[str | None] = []
        for run in self.runs(stage, "done"):
            if run.run_name not in names:
                names.append(run.run_name)
        return names

    def last_done(self, stage: str, run_name: Any = ANY_RUN) -> RunRecord | None:
        runs = self.runs(stage, "done", run_name)
        return runs[0] if runs else None


def _relative(path: Path, root: Path) -> str:
    """An artifact's path as the catalog records it: relative to the workspace (runs/NAME/best.pt)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _has_column(con: duckdb.DuckDBPyConnection, table: str, column: str) -> bool:
    """Read-only connections cannot migrate: an old catalog lacks the columns newer versions add."""
    return bool(_scalar(con, "SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND "
                        "column_name = ?", [table, column]))


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    """The one value of a one-row query."""
    row = con.execute(sql, params or []).fetchone()
    return None if row is None else row[0]
