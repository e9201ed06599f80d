"""Ranking metrics on item ids: Recall@K and NDCG@K, one relevant item per user (DESIGN section 3).

Pure torch, no I/O. A ranked list is a row of item ids, best first, with -1 for an empty slot (beam
search may return fewer valid items than asked for). Metrics are computed on item ids, never on code
strings: a shared code would count as a hit for every item of its collision group.

With a single relevant item the ideal DCG is 1, so NDCG@K is 1 / log2(rank + 2) for a 0-based rank
below K and 0 otherwise (the paper's 1 / log2(rank + 1) with 1-based ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MISS = -1  # rank of a target that is not in the list (also the empty-slot id in predictions)


def _check_k(k: object, name: str = "k") -> int:
    """k as an int, or a ValueError naming the bad value (True is an int but not a cut-off)."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return k


def _check_integer(x: Tensor, name: str, ndim: int) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer item ids, got dtype {x.dtype}")


def ranks(predicted: Tensor, target: Tensor) -> Tensor:
    """0-based position of each target in its ranked list, or MISS (-1) when absent.

    predicted: (B, M) int item ids, best first, -1 = empty slot; target: (B,) int item ids.
    Lists are assumed to hold each item at most once (decoding maps code sequences to items one to
    one); should an item repeat, its first occurrence counts. Empty slots never match, even a target
    of -1. Returns (B,) int64 on predicted's device.
    """
    _check_integer(predicted, "predicted", 2)
    _check_integer(target, "target", 1)
    if predicted.shape[0] != target.shape[0]:
        raise ValueError(
            f"predicted has {predicted.shape[0]} rows but target has {target.shape[0]} entries"
        )
    B, M = predicted.shape
    if M == 0:
        return torch.full((B,), MISS, dtype=torch.long, device=predicted.device)
    target = target.to(predicted.device)
    hit = (predicted == target[:, None]) & (predicted != MISS)  # (B, M)
    position = torch.arange(M, device=predicted.device).expand(B, M)  # (B, M)
    first = torch.where(hit, position, M).min(dim=1).values  # (B,), M where no hit
    return torch.where(first < M, first, MISS).long()


def recall_at(rank: Tensor, k: int) -> Tensor:
    """(B,) float64: 1 where 0 <= rank < k, else 0."""
    k = _check_k(k)
    return ((rank >= 0) & (rank < k)).double()


def ndcg_at(rank: Tensor, k: int) -> Tensor:
    """(B,) float64: 1 / log2(rank + 2) where 0 <= rank < k, else 0 (one relevant item: IDCG = 1)."""
    k = _check_k(k)
    hit = (rank >= 0) & (rank < k)
    gain = 1.0 / torch.log2(rank.clamp(min=0).double() + 2.0)
    return torch.where(hit, gain, torch.zeros_like(gain))


def check_ks(ks: Sequence[int]) -> list[int]:
    """The cut-offs as a list, or a ValueError naming the first bad one (or saying there are none)."""
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty; give at least one cut-off, e.g. [5, 10]")
    return [_check_k(k, name=f"ks entry {i}") for i, k in enumerate(ks)]


def summarize(rank: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Means over users: {"recall@k": ..., "ndcg@k": ...} for each k in ks, in the order given."""
    ks = check_ks(ks)
    if rank.dim() != 1:
        raise ValueError(f"rank must be 1-D (one entry per user), got shape {tuple(rank.shape)}")
    if rank.numel() == 0:
        raise ValueError("cannot summarize metrics over 0 users; the evaluation batch is empty")
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at(rank, k).mean().item()
        out[f"ndcg@{k}"] = ndcg_at(rank, k).mean().item()
    return out


def popularity_ranking(train_items: Tensor, num_items: int, k: int) -> Tensor:
    """(k,) int64: the k items seen most often in training, most frequent first.

    Ties (unseen items included, at count 0) go to the smaller item id, via a stable sort of the
    bincount; slots past num_items are -1. The same list for every user: the popularity baseline.
    """
    _check_integer(train_items, "train_items", 1)
    k = _check_k(k)
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise ValueError(f"num_items must be a non-negative integer, got {num_items!r}")
    if train_items.numel() and (train_items.min() < 0 or train_items.max() >= num_items):
        bad = train_items[(train_items < 0) | (train_items >= num_items)][0].item()
        raise ValueError(f"train_items holds item id {bad}, outside [0, num_items={num_items})")
    counts = torch.bincount(train_items.long(), minlength=num_items)  # (num_items,)
    order = torch.sort(counts, descending=True, stable=True).indices[:k]  # (min(k, num_items),)
    top = torch.full((k,), MISS, dtype=torch.long, device=train_items.device)
    top[: order.numel()] = order
    return top


class MetricAccumulator:
    """Collects ranks over evaluation batches (kept on the CPU) and summarizes them at the end."""

    def __init__(self) -> None:
        self._chunks: list[Tensor] = []

    def add(self, rank: Tensor) -> None:
        """Append a (B,) batch of ranks as returned by `ranks`."""
        if rank.dim() != 1:
            raise ValueError(f"rank must be 1-D (one entry per user), got shape {tuple(rank.shape)}")
        self._chunks.append(rank.detach().to("cpu", torch.long))

    def update(self, predicted: Tensor, target: Tensor) -> Tensor:
        """Rank one batch of (B, M) predictions against (B,) targets, add it, return the ranks."""
        rank = ranks(predicted, target)
        self.add(rank)
        return rank

    @property
    def n_users(self) -> int:
        return sum(c.numel() for c in self._chunks)

    @property
    def rank(self) -> Tensor:
        """(N,) int64: every rank added so far, in order."""
        if not self._chunks:
            return torch.empty(0, dtype=torch.long)
        return torch.cat(self._chunks)

    def summarize(self, ks: Sequence[int]) -> dict[str, float]:
        return summarize(self.rank, ks)


__all__ = [
    "MISS",
    "MetricAccumulator",
    "check_ks",
    "ndcg_at",
    "popularity_ranking",
    "ranks",
    "recall_at",
    "summarize",
]
