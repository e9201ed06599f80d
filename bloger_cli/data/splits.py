"""The leave-one-out protocol as DuckDB SQL over the sequences artifact.

For a user with items s_1..s_n (time order): the test sample predicts s_n from s_1..s_{n-1}, the
validation sample s_{n-1} from s_1..s_{n-2}, and training has one sample per earlier target s_2..s_{n-2}
from its prefix. Every history keeps at most `max_history` of the most recent items.
"""

from __future__ import annotations

from typing import Literal

Split = Literal["train", "valid", "test"]

MIN_SEQUENCE = 3  # a user needs a training item, a validation target and a test target


def split_query(sequences: str, split: Split, max_history: int) -> str:
    """SQL yielding (user_id, history list<int32>, target int32) for one split.

    `sequences` is a relation with columns user_id and items (list, time order, 1-based in SQL).
    """
    if split == "train":
        # i = 1-based index of the last history item; targets s_{i+1} for i+1 in 2..n-2
        positions = "unnest(range(1, len(items) - 2)) AS i"
    elif split == "valid":
        positions = "len(items) - 2 AS i"
    else:
        positions = "len(items) - 1 AS i"
    return (
        f"SELECT user_id, list_slice(items, greatest(1, i - {int(max_history)} + 1), i) AS history, "
        f"items[i + 1] AS target FROM (SELECT user_id, items, {positions} FROM {sequences} "
        f"WHERE len(items) >= {MIN_SEQUENCE}) WHERE i >= 1 ORDER BY user_id, i"
    )


def sample_counts(lengths_sql: str) -> str:
    """SQL counting samples per split from a relation with a column `n` (sequence lengths)."""
    return (f"SELECT sum(greatest(n - 3, 0))::BIGINT AS train, count(*)::BIGINT AS valid, "
            f"count(*)::BIGINT AS test FROM {lengths_sql} WHERE n >= {MIN_SEQUENCE}")
