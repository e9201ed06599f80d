"""The one progress helper: rich bars and step spinners on stderr, silent when quiet or not a terminal.

Rich allows one live display at a time, so a stage's step spinner (`Steps`) and the bars inside it
(`track`) share one `Progress`: a bar started while steps are shown becomes a second line of the same
display and disappears when it ends.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)
T = TypeVar("T")

_state: dict = {"quiet": False, "live": None}


def set_quiet(quiet: bool) -> None:
    """Called by the CLI for --quiet; bars are also off whenever stderr is not a terminal."""
    _state["quiet"] = quiet


def enabled() -> bool:
    return not _state["quiet"] and sys.stderr.isatty()


def _start() -> Progress:
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True)
    progress.start()
    _state["live"] = progress
    return progress


def _stop(progress: Progress) -> None:
    progress.stop()
    _state["live"] = None


class Steps:
    """A spinner naming the current step of a multi-step stage; each step is also logged."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._progress: Progress | None = None
        self._owned = False
        self._task = None

    def __enter__(self) -> Steps:
        if enabled():
            self._progress = _state["live"]
            self._owned = self._progress is None
            if self._owned:
                self._progress = _start()
            self._task = self._progress.add_task(self.title, total=None, count="")
        return self

    def step(self, message: str) -> None:
        log.debug("%s: %s", self.title, message)
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.title}: {message}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.remove_task(self._task)
            if self._owned:
                _stop(self._progress)


class Bar:
    """A progress bar with a free-text status (loss, throughput) beside the count; a no-op when disabled.

        with Bar(total=steps, description="epoch 3") as bar:
            for ...: bar.advance(status=f"loss {loss:.3f}")
    """

    def __init__(self, total: int | None, description: str) -> None:
        self.total, self.description = total, description
        self.done = 0
        self._progress: Progress | None = None
        self._owned = False
        self._task = None

    def __enter__(self) -> Bar:
        if enabled():
            self._progress = _state["live"]
            self._owned = self._progress is None
            if self._owned:
                self._progress = _start()
            self._task = self._progress.add_task(self.description, total=self.total, count=self._count(""))
        return self

    def _count(self, status: str) -> str:
        count = f"{self.done}/{self.total if self.total is not None else '?'}"
        return f"{count} {status}" if status else count

    def advance(self, n: int = 1, status: str = "") -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n, count=self._count(status))

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.remove_task(self._task)
            if self._owned:
                _stop(self._progress)


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Iterate with a progress bar (count, elapsed) when enabled; joins the live display if there is one."""
    with Bar(total, description) as bar:
        for item in items:
            yield item
            bar.advance()
