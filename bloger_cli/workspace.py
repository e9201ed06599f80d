"""The workspace: its layout, its lock, and the one stage runner every stage goes through.

`run_stage` gives every stage the same behaviour: a lock against concurrent runs, a no-op when the
inputs and config are unchanged (unless forced), outputs written to temporary files and renamed into
place only when the whole stage succeeded, and a run record in the catalog.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from bloger_cli import journal
from bloger_cli.artifacts import RUN_STAGES, SPECS, ArtifactInfo, file_hash, make_metadata, read_info, temp_path_for
from bloger_cli.catalog import Catalog, RunRecord
from bloger_cli.config import config_hash
from bloger_cli.config_base import StrictModel
from bloger_cli.errors import ArtifactError, ConfigError, Interrupted, WorkspaceBusy, WorkspaceError

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = Path("bloger-work")


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RUNS_DIR = "runs"


class Workspace:
    """A directory holding `catalog.duckdb`, the stage artifacts and a lock file.

    The data, embeddings and tokenizer are shared by the workspace's runs; each run of train-bilevel,
    evaluate and baseline has its own artifacts under `runs/NAME/` (`run`), or at the root for the
    unnamed run (`run=None`, which is also how every workspace made before named runs reads).
    """

    def __init__(self, root: Path | str, run: str | None = None) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise WorkspaceError(f"workspace {self.root} is a file, not a directory",
                                 hint="give --workspace a directory path")
        if run is not None and not RUN_NAME.fullmatch(run):
            raise ConfigError(f"--run {run!r}: a run name is letters, digits, '.', '_' and '-' (at most 100, "
                              "starting with a letter or digit)")
        self.run = run
        self.catalog = Catalog(self.root / "catalog.duckdb")

    @property
    def run_dir(self) -> Path:
        """Where this run's own artifacts live."""
        return self.root if self.run is None else self.root / RUNS_DIR / self.run

    def path(self, kind: str) -> Path:
        spec = SPECS[kind]
        return (self.run_dir if spec.per_run else self.root) / spec.filename

    def with_run(self, run: str | None) -> Workspace:
        return Workspace(self.root, run)

    def latest_run(self) -> Workspace:
        """This workspace at its run: the one named, else the run whose training finished last (the
        unnamed run when there is none)."""
        if self.run is not None:
            return self
        names = self.catalog.run_names("train-bilevel")
        return self.with_run(names[0] if names else None)

    def info(self, kind: str, *, with_hash: bool = False) -> ArtifactInfo:
        """The current artifact of a kind, schema-checked; a clear error when it is missing."""
        return read_info(self.path(kind), SPECS[kind], with_hash=with_hash)

    def inputs(self, *kinds: str) -> dict[str, ArtifactInfo]:
        """Schema-checked input artifacts whose lineage fits together.

        Each input's recorded parents must be the workspace's current artifacts of those kinds: an
        embeddings file made from another items file is refused, naming both and the command to run.
        """
        if (self.root / journal.JOURNAL).is_file():  # a killed stage left its commit half done: finish it
            with self.lock(60.0):
                roll_forward(self)
        infos = {kind: self.info(kind, with_hash=True) for kind in kinds}
        for kind, info in infos.items():
            for parent, recorded in info.parents.items():
                if parent not in SPECS:
                    continue
                current = infos[parent].content_hash if parent in infos else (
                    file_hash(self.path(parent)) if self.path(parent).is_file() else None)
                if current is not None and current != recorded:
                    raise ArtifactError(
                        f"{info.path} was made from another {parent} artifact (recorded {recorded}, "
                        f"{self.path(parent).name} is now {current})",
                        hint=f"re-run `bloger {SPECS[kind].producer}`",
                    )
        return infos

    @contextmanager
    def lock(self, timeout: float) -> Iterator[None]:
        """Hold the workspace lock; a second process waits up to `timeout` seconds, then fails.

        The lock is an OS file lock (flock), which the kernel frees when its holder dies, even by
        SIGKILL: a killed run never blocks the next one. Beside it the holder writes `.bloger.lock.owner`
        (pid, host, since) and removes it on release; finding it on acquiring means the last holder died
        holding the lock, which is said, and the lock taken over."""
        self.check_writable()
        lock = FileLock(str(self.root / ".bloger.lock"))
        owner = self.root / LOCK_OWNER
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise WorkspaceBusy(
                f"workspace {self.root} is in use by another bloger process{_holder(owner)} (waited {timeout:g}s)",
                hint="wait for it to finish or raise --lock-timeout",
            ) from None
        try:
            if owner.is_file():
                log.warning("workspace %s: the bloger process%s that held its lock ended without releasing it "
                            "(killed?); taking the lock over", self.root, _holder(owner))
            owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            yield
        finally:
            owner.unlink(missing_ok=True)
            lock.release()

    def check_writable(self) -> None:
        """Fail before any work when files cannot be made in the workspace. A real probe file, not
        os.access: root passes access checks on directories it cannot write (read-only mounts aside)."""
        probe = self.root / f".bloger-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise WorkspaceError(f"workspace {self.root} is not writable: cannot create {probe.name} there "
                                 f"({exc.strerror})",
                                 hint="make it writable (chmod u+w) or give --workspace another directory") from None


LOCK_OWNER = ".bloger.lock.owner"


def _holder(owner: Path) -> str:
    """" (pid 123 on host, since ...)" from a lock owner file, or "" when there is none or it is unreadable."""
    try:
        info = json.loads(owner.read_text())
        return f" (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def run_flag(ws: Workspace) -> str:
    """` --run NAME` for a hint that repeats a command on this run ("" for the unnamed run)."""
    return "" if ws.run is None else f" --run {ws.run}"


def raw_fingerprint(path: Path) -> str:
    """A cheap identity for a raw input file: size and modification time."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


@dataclass
class StageContext:
    """What a stage body gets: where to write its outputs and the metadata to put in them."""

    workspace: Workspace
    stage: str
    run_id: str
    config_hash: str
    parents: dict[str, str]
    pending: dict[str, Path] = field(default_factory=dict)

    def output(self, kind: str) -> Path:
        """A temporary path for an output artifact; renamed into place when the stage succeeds."""
        spec = SPECS[kind]
        if spec.producer != self.stage:
            raise AssertionError(f"stage {self.stage} cannot write {kind} (produced by {spec.producer})")
        final = self.workspace.path(kind)
        final.parent.mkdir(parents=True, exist_ok=True)  # runs/NAME/ on a run's first output
        tmp = temp_path_for(final)
        self.pending[kind] = tmp
        return tmp

    def metadata(self, kind: str, meta: dict[str, Any] | None = None) -> dict[str, str]:
        return make_metadata(SPECS[kind], self.config_hash, self.parents, meta)


@dataclass
class StageResult:
    stage: str
    run_id: str
    skipped: bool
    result: dict[str, Any]


def _fingerprint(stage: str, cfg_hash: str, inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "config": cfg_hash, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outputs_intact(ws: Workspace, run: RunRecord) -> bool:
    current = ws.catalog.current_artifacts(ws.run)
    for row in current.values():
        if row["run_id"] != run.run_id:
            continue
        path = ws.root / row["path"]
        # Compare raw bytes: a file damaged outside bloger must read as changed, not fail to parse.
        if not path.is_file() or file_hash(path) != row["content_hash"]:
            return False
    return any(row["run_id"] == run.run_id for row in current.values())


def run_stage(
    ws: Workspace,
    stage: str,
    config: StrictModel,
    inputs: dict[str, str],
    body: Callable[[StageContext], dict[str, Any]],
    *,
    force: bool = False,
    lock_timeout: float = 60.0,
    same_kind: Callable[[RunRecord], bool] | None = None,
) -> StageResult:
    """Run one stage under the lock; skip it when the same inputs and config already produced outputs.

    `inputs` maps each input ("artifact:KIND" or "file:PATH") to its fingerprint; the parents recorded
    in the outputs' metadata are the artifact inputs' content hashes. `same_kind` narrows the earlier
    run to compare with (baseline: the last run of the same model, so that running popularity between
    two identical SASRec runs does not retrain SASRec).
    """
    created = not ws.root.exists()
    try:
        ws.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot create workspace {ws.root}: {exc.strerror}") from None
    cfg_hash = config_hash(config)
    fingerprint = _fingerprint(stage, cfg_hash, inputs)
    committed = False
    ours = False  # remove the workspace on failure only if this run made it and nobody used it since
    try:
        with ws.lock(lock_timeout):
            # another process may have made the same new workspace between our check and the lock
            ours = created and not ws.catalog.path.exists()
            roll_forward(ws)
            name = ws.run if stage in RUN_STAGES else None
            last = ws.catalog.last_done(stage, name) if same_kind is None else next(
                (run for run in ws.catalog.runs(stage, "done", name) if same_kind(run)), None)
            if not force and last and last.fingerprint == fingerprint and _outputs_intact(ws, last):
                log.info("%s is up to date (run %s); use --force to redo it", stage, last.run_id)
                return StageResult(stage, last.run_id, True, last.result)
            run_id = ws.catalog.start_run(stage, config.model_dump(mode="json"), cfg_hash, fingerprint, inputs,
                                          name)
            parents = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("artifact:")}
            ctx = StageContext(ws, stage, run_id, cfg_hash, parents)
            try:
                result = body(ctx)
                commit = _decide(ws, ctx, result, name)
                committed = True
            except BaseException as exc:
                for tmp in ctx.pending.values():
                    tmp.unlink(missing_ok=True)
                stopped = isinstance(exc, (KeyboardInterrupt, Interrupted))
                ws.catalog.finish_run(run_id, "interrupted" if stopped else "failed",
                                      error=str(exc) or type(exc).__name__)
                raise
            _complete(ws, commit)  # decided: a failure from here on is rolled forward by the next run
            return StageResult(stage, run_id, False, result)
    finally:
        if ours and not committed and ws.root.exists():
            shutil.rmtree(ws.root, ignore_errors=True)  # leave no half-made workspace behind


def _decide(ws: Workspace, ctx: StageContext, result: dict[str, Any], run_name: str | None) -> journal.Commit:
    """Check every pending output, then write the commit journal: from here the outputs switch together."""
    for kind, tmp in ctx.pending.items():
        if not tmp.is_file():
            raise ArtifactError(f"stage {ctx.stage} did not write its {kind} output")
        read_info(tmp, SPECS[kind])  # a schema error here is a bug; it must not replace a good file
    root = ws.root
    moves = [(str(tmp.relative_to(root)), str(ws.path(kind).relative_to(root))) for kind, tmp in ctx.pending.items()]
    commit = journal.Commit(ctx.run_id, ctx.stage, run_name, result, moves)
    journal.fault("commit:before-journal")
    journal.write(root, commit)
    journal.fault("commit:after-journal")
    return commit


def _complete(ws: Workspace, commit: journal.Commit) -> None:
    """Carry out a decided commit: the renames, then the run and its artifacts in one catalog transaction,
    then the journal goes. Safe to repeat after a kill at any point."""
    journal.apply(ws.root, commit)
    journal.fault("commit:before-catalog")
    if next((r.status for r in ws.catalog.runs(commit.stage) if r.run_id == commit.run_id), None) != "done":
        infos = [read_info(final, SPECS[_kind_at(ws, final)], with_hash=True) for final in commit.finals(ws.root)]
        ws.catalog.finish_run(commit.run_id, "done", result=commit.result, artifacts=infos, run_name=commit.run_name)
    journal.fault("commit:before-clear")
    journal.clear(ws.root)


def _kind_at(ws: Workspace, path: Path) -> str:
    return next(kind for kind, spec in SPECS.items() if spec.filename == path.name)


def roll_forward(ws: Workspace) -> str | None:
    """Finish the commit a killed process decided but did not complete (under the lock)."""
    commit = journal.read(ws.root)
    if commit is None:
        return None
    log.warning("finishing the outputs of %s run %s, which stopped while switching them in", commit.stage,
                commit.run_id)
    _complete(ws, commit)
    return f"finished the commit of {commit.stage} run {commit.run_id} ({len(commit.moves)} outputs)"


def is_busy(ws: Workspace) -> bool:
    """Whether a bloger process holds the workspace lock now."""
    try:
        with ws.lock(timeout=0):
            return False
    except WorkspaceBusy:
        return True


