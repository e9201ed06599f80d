"""Amazon review dumps (2014, 2018, 2023). Placeholder: being written in this session."""

from __future__ import annotations

from bloger_cli.errors import ConfigError


def _todo(*_args, **_kw):
    raise ConfigError("source 'amazon'/'amazon2023' is not available yet")


amazon_files = load_amazon = amazon2023_files = load_amazon2023 = _todo
