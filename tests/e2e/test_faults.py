"""Full disks, read-only workspaces and two writers: a write that fails midway leaves the earlier
artifacts and no temporary file behind and names the file; a read-only workspace is refused before any
work; a second writer exits 3 at once or waits with --lock-timeout; a killed holder blocks nobody."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, tree_digest
from test_cli_prepare import bloger_command

TRAIN = ["--mode", "fixed", "--epochs", "1", "--batch-size", "64", "--device", "cpu", *TINY_MODEL]


def temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or "probe" in p.name)


def artifacts(root: Path) -> dict[str, str]:
    """The digests of the stage outputs (the catalog records the failed run, and may keep a WAL when its
    own checkpoint hit the limit too; the in-progress training directory is this run's own)."""
    return {k: v for k, v in tree_digest(root).items()
            if not k.startswith("catalog.duckdb") and not k.startswith("training/")}


def test_disk_full_midway_through_a_checkpoint(trained_workspace: Path, monkeypatch, cli) -> None:
    import torch

    real = torch.save

    def half_then_full(obj, path, *args, **kwargs):  # writes part of the file, then the disk is full
        real(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    before = artifacts(trained_workspace)
    monkeypatch.setattr(torch, "save", half_then_full)
    out = cli("train-bilevel", "-w", trained_workspace, *TRAIN, "--force")
    assert out.exit_code == 1 and "Traceback" not in out.output
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: cannot write {trained_workspace / 'training' / 'last.pt'}: No space left on device "
                     "(disk full?)"]
    assert artifacts(trained_workspace) == before and temp_files(trained_workspace) == []


FSIZE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from bloger_cli.cli import app
sys.exit(app(sys.argv[2:], prog_name="bloger", standalone_mode=True))
"""


@pytest.mark.slow
def test_file_size_limit_midway_through_a_stage(trained_workspace: Path) -> None:
    # a real failing write: RLIMIT_FSIZE below the size of best.pt (the catalog's writes stay under it)
    before = artifacts(trained_workspace)
    limit = (trained_workspace / "best.pt").stat().st_size // 2
    proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(limit), "train-bilevel", "-w",
                           str(trained_workspace), *TRAIN, "--force"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(f"error: cannot write {trained_workspace / 'training'}/"), error
    assert artifacts(trained_workspace) == before and temp_files(trained_workspace) == []
    from bloger_cli.status import stage_status
    from bloger_cli.workspace import Workspace

    status = {row["stage"]: row for row in stage_status(Workspace(trained_workspace))}  # the catalog still reads
    assert status["train-bilevel"]["state"] == "done"


def test_read_only_workspace_is_refused_before_any_work(trained_workspace: Path, monkeypatch, fails_cleanly) -> None:
    from bloger_cli import workspace

    # Root writes through chmod 0555, so the read-only place is simulated where the probe writes (the
    # non-root case below uses a real chmod); the message is the same.
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".bloger-probe-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, data)

    monkeypatch.setattr(workspace.Path, "write_bytes", read_only)
    message = fails_cleanly(trained_workspace, 2, "train-bilevel", "-w", trained_workspace, *TRAIN, "--force")
    assert message == (f"error: workspace {trained_workspace} is not writable: cannot create "
                       f".bloger-probe-{os.getpid()} there (Read-only file system)\n"
                       "  hint: make it writable (chmod u+w) or give --workspace another directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0555 directory; see the test above")
def test_chmod_read_only_workspace(trained_workspace: Path, fails_cleanly) -> None:
    trained_workspace.chmod(0o555)
    try:
        message = fails_cleanly(trained_workspace, 2, "evaluate", "-w", trained_workspace, "--force")
    finally:
        trained_workspace.chmod(0o755)
    assert message.startswith(f"error: workspace {trained_workspace} is not writable: cannot create ")
    assert "(Permission denied)" in message


def start(*args: object, ws: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "BLOGER_WORKSPACE"}
    return subprocess.Popen([*bloger_command(), *map(str, args)], cwd=ws.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_two_writers_at_the_same_moment(trained_workspace: Path) -> None:
    # a time budget keeps the winner in the lock long after the loser has imported and tried it
    args = ["train-bilevel", "-w", trained_workspace, *TRAIN, "--epochs", "1000", "--set", "train.time_budget=8s",
            "--set", "train.val_users=8", "--force", "--lock-timeout", "0"]
    procs = [start(*args, ws=trained_workspace) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 3], results
    loser = next(err for code, err in results if code == 3)
    assert f"error: workspace {trained_workspace} is in use by another bloger process (pid " in loser


HOLDER = """
import sys, time
from bloger_cli.workspace import Workspace
with Workspace(sys.argv[1]).lock(0):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_writer_exits_3_at_once_or_waits(trained_workspace: Path, cli) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(trained_workspace)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        out = cli("evaluate", "-w", trained_workspace, "--force", "--lock-timeout", "0")
        assert out.exit_code == 3 and time.monotonic() - started < 5
        assert out.stderr.startswith(f"error: workspace {trained_workspace} is in use by another bloger process "
                                     f"(pid {holder.pid} on ")
        # with --lock-timeout it waits; the holder is killed meanwhile (SIGKILL: no clean release)
        killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({holder.pid}, 9)"])
        started = time.monotonic()
        out = cli("evaluate", "-w", trained_workspace, "--force", "--lock-timeout", "60")
        killer.wait(timeout=10)
        assert out.exit_code == 0, out.output
        assert 1.0 < time.monotonic() - started < 60
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert "ended without releasing it (killed?); taking the lock over" in " ".join(out.stderr.split())


def test_a_killed_holder_blocks_nobody(trained_workspace: Path, cli) -> None:
    # flock: the kernel frees the lock when its holder dies, so no lock is ever stale; the owner file it
    # leaves is how the next run knows to say so
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(trained_workspace)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert (trained_workspace / ".bloger.lock.owner").is_file()
    out = cli("evaluate", "-w", trained_workspace, "--force", "--lock-timeout", "0")
    assert out.exit_code == 0, out.output
    assert f"(pid {holder.pid} on " in out.stderr and "taking the lock over" in " ".join(out.stderr.split())
    assert not (trained_workspace / ".bloger.lock.owner").exists()
