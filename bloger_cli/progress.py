"""The one progress helper: rich bars and step spinners on stderr, silent when quiet or not a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)
T = TypeVar("T")

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Called by the CLI for --quiet; bars are also off whenever stderr is not a terminal."""
    _state["quiet"] = quiet


def enabled() -> bool:
    return not _state["quiet"] and sys.stderr.isatty()


def _console() -> Console:
    return Console(stderr=True)


class Steps:
    """A spinner naming the current step of a multi-step stage; each step is also logged."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "Steps":
        if enabled():
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=_console(), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.title)
        return self

    def step(self, message: str) -> None:
        log.debug("%s: %s", self.title, message)
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.title}: {message}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Iterate with a progress bar (count, rate, elapsed) when enabled."""
    if not enabled():
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
