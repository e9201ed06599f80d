"""A stage's outputs switch all together or not at all: the commit journal.

A stage writes every output to a temporary file beside its final place. To switch them in, the runner
first writes `.bloger-commit.json` (atomically: temporary file, fsync, rename) naming the run and each
(temporary, final) pair; from that moment the commit is decided. Then it renames the files, records the
run and its artifacts in the catalog in one transaction, and deletes the journal. A process killed
before the journal exists leaves the earlier outputs as they were (and temporary files to sweep); one
killed after it leaves a journal that the next stage run, or `bloger status --repair`, rolls forward:
the remaining renames, then the catalog transaction. Either way no reader ever has to live with one
stage's outputs from two runs.

`fault(point)` lets tests kill the process (SIGKILL) at a named point: `BLOGER_FAULT=POINT`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bloger_cli.artifacts import TEMP_NAME
from bloger_cli.errors import DamagedFile

log = logging.getLogger(__name__)

JOURNAL = ".bloger-commit.json"


def fault(point: str) -> None:
    """Die here, as a kill -9 would, when BLOGER_FAULT names this point (fault-injection tests)."""
    if os.environ.get("BLOGER_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Commit:
    """What a decided commit still has to do: rename `moves` (paths relative to the workspace) and
    record the run as done with `result`."""

    run_id: str
    stage: str
    run_name: str | None
    result: dict[str, Any]
    moves: list[tuple[str, str]]

    def finals(self, root: Path) -> list[Path]:
        return [root / final for _, final in self.moves]


def write(root: Path, commit: Commit) -> None:
    """Decide the commit: the journal is on disk (and synced) when this returns."""
    path, tmp = root / JOURNAL, root / f"{JOURNAL}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(commit), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(root)


def read(root: Path) -> Commit | None:
    """The decided commit left by a process that died in the middle of it, if any."""
    path = root / JOURNAL
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Commit(data["run_id"], data["stage"], data.get("run_name"), data["result"],
                      [tuple(m) for m in data["moves"]])
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedFile(f"{path} is not a readable commit journal ({exc})",
                          hint="remove it and re-run the stage it names (`bloger status` lists them)") from None


def apply(root: Path, commit: Commit) -> None:
    """The renames of a decided commit; a rename done before (the temporary file gone, the final there)
    is skipped, so applying twice is the same as once."""
    for i, (tmp, final) in enumerate(commit.moves):
        source, target = root / tmp, root / final
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        elif not target.is_file():
            raise DamagedFile(f"{root / JOURNAL}: neither {source} nor {target} exists",
                              hint=f"remove the journal and re-run `bloger {commit.stage} --force`")
        if i == 0:
            fault("commit:after-first-rename")
    _sync_dir(root)


def clear(root: Path) -> None:
    (root / JOURNAL).unlink(missing_ok=True)


def stray_temps(root: Path, keep: frozenset[Path] | set[Path] = frozenset()) -> list[Path]:
    """Temporary files of writers that died (their process is gone), outside a pending commit."""
    found = []
    for directory in (root, *sorted(p for p in (root / "runs").glob("*") if p.is_dir()),
                      *sorted(p for p in root.rglob("training") if p.is_dir())):
        for path in directory.iterdir() if directory.is_dir() else ():
            match = TEMP_NAME.match(path.name)
            if match and path.is_file() and path not in keep and not _alive(int(match["pid"])):
                found.append(path)
    return sorted(set(found))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the renames are still atomic there
        log.debug("cannot fsync %s", directory)
    finally:
        os.close(fd)
