"""The cut-offs K of the ranking metrics as configs take them: `--k 5,10`, a TOML list, or a number."""

from __future__ import annotations

from typing import Any

DEFAULT_KS = (1, 5, 10, 20)


def parse_ks(value: Any) -> Any:
    """`--k 5,10` (or a bare number) -> [5, 10]; lists pass through to the type check."""
    if isinstance(value, (str, int)):
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"k must be comma-separated whole numbers like 1,5,10,20 (got {value!r})")
        return [int(p) for p in parts]
    return value


def positive_ks(value: list[int]) -> list[int]:
    bad = [k for k in value if k < 1]
    if bad:
        raise ValueError(f"every k must be at least 1 (got {bad[0]})")
    return sorted(set(value))
