"""The order of the training samples in an epoch: shuffled, then grouped by history length.

Beauty's training histories are 6.7 items on average (median 4; 11.5% reach the cap of 20), yet the
longest sample of almost any random batch of 256 reaches the cap, so a batch padded to its longest
sample is still mostly padding. Length grouping (as fairseq's and Hugging Face's `group_by_length`
do): shuffle all samples, cut the order into megabatches of `group` batches, sort each megabatch by
history length, cut it into batches, and shuffle the batches. Batches stay random in which samples
and lengths they hold from one step to the next, while the samples inside one batch have similar
lengths, so `Samples.trim` to the batch's longest removes nearly all padding (docs/design.md §4.3).

Everything is a function of (seed, epoch), so a run resumed mid-epoch replays the same batches.
"""

from __future__ import annotations

import torch
from torch import Tensor


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """A random permutation of n samples, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=_generator(seed, epoch))


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_batches(seed: int, epoch: int, lengths: Tensor, batch_size: int, group: int | None) -> list[Tensor]:
    """The epoch's batches as CPU index tensors, ceil(S / batch_size) of them; lengths (S,) on the CPU.

    group None or 0: consecutive slices of `epoch_order` (no grouping). Otherwise megabatches of
    `group * batch_size` samples are sorted by length (stable: ties stay in random order) before they
    are cut, and the batches are shuffled with the same generator; only the last batch can be short.
    """
    g = _generator(seed, epoch)
    order = torch.randperm(len(lengths), generator=g)
    if not group:
        return list(order.split(batch_size))
    batches: list[Tensor] = []
    for chunk in order.split(group * batch_size):
        batches.extend(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def padding_waste(batches: list[Tensor], lengths: Tensor) -> float:
    """The share of history slots that are padding when each batch is trimmed to its longest sample."""
    slots = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - float(lengths.sum()) / max(slots, 1)
