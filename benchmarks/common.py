"""What the benchmark scripts share (each runs as `python benchmarks/NAME.py`, so this imports as `common`)."""

from __future__ import annotations

import os


def rss_mib() -> float:
    """This process's resident set size now, in MiB (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
