"""Exceptions the library raises; the CLI turns each into one line and an exit code.

Every message says what was wrong, the offending value, and what to do about it.
"""

from __future__ import annotations


class BlogerError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ConfigError(BlogerError):
    """A bad option, config file or override (usage error, exit 2)."""

    exit_code = 2


class WorkspaceError(BlogerError):
    """The workspace path is unusable (a file, unwritable, ...) (exit 2)."""

    exit_code = 2


class DataError(BlogerError):
    """Input data that cannot be used: missing, empty, malformed, or filtered to nothing (exit 1)."""

    exit_code = 1


class ArtifactError(DataError):
    """An artifact is missing, has the wrong schema, or does not fit its lineage (exit 1)."""


class DamagedFile(ArtifactError):
    """A file that cannot be what its name says: truncated, foreign, another layout, non-finite numbers
    (exit 2: re-running the stage that writes it fixes it; retrying the same command does not)."""

    exit_code = 2


class WriteFailed(BlogerError):
    """A write failed midway (disk full, file size limit, read-only place); the partial file is gone and
    earlier artifacts are as they were (exit 1)."""


class Diverged(BlogerError):
    """Training met a non-finite loss or gradient `max_bad_steps` times in a row (exit 1)."""


class WorkspaceBusy(BlogerError):
    """Another bloger process holds the workspace lock (exit 3, so schedulers can retry)."""

    exit_code = 3


class Interrupted(BlogerError):
    """Stopped by the user (Ctrl-C / SIGINT) at a safe point; the hint says how to continue (exit 130)."""

    exit_code = 130
