"""MovieLens (ml-100k, ml-1m, ml-10m). Placeholder: being written in this session."""

from __future__ import annotations

from bloger_cli.errors import ConfigError


def _todo(*_args, **_kw):
    raise ConfigError("source 'movielens' is not available yet")


movielens_files = load_movielens = _todo
