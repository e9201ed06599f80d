"""Synthetic data. Placeholder: being written in this session."""

from __future__ import annotations

from bloger_cli.errors import ConfigError


def _todo(*_args, **_kw):
    raise ConfigError("source 'synthetic' is not available yet")


synthetic_files = load_synthetic = _todo
