"""The progress helper: silent without a terminal, and one live display when steps and bars nest."""

from __future__ import annotations

from bloger_cli import progress


def test_track_without_a_terminal_yields_everything():
    assert list(progress.track(iter(range(5)), 5, "work")) == [0, 1, 2, 3, 4]


def test_nested_bar_joins_the_steps_display(monkeypatch):
    monkeypatch.setattr(progress, "enabled", lambda: True)
    with progress.Steps("stage") as steps:
        live = progress._state["live"]
        assert live is not None
        steps.step("inner work")
        seen = []
        for item in progress.track(range(3), 3, "epochs"):
            assert progress._state["live"] is live and len(live.tasks) == 2  # the spinner and the bar
            seen.append(item)
        assert seen == [0, 1, 2] and len(live.tasks) == 1
    assert progress._state["live"] is None


def test_quiet_turns_bars_off(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    progress.set_quiet(True)
    try:
        assert not progress.enabled()
    finally:
        progress.set_quiet(False)
