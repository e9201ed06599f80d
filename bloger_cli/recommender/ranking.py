"""From histories to rankings: the one decoder behind `evaluate` (which scores the ranking) and
`recommend` and the training loop's validation (which serve or select on it), so all of them rank a
given history identically.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from bloger_cli.data.samples import Samples
from bloger_cli.metrics import MetricAccumulator
from bloger_cli.progress import Bar
from bloger_cli.recommender.batch import make_batch
from bloger_cli.recommender.decoding import PrefixIndex, Ranking, recommend
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import Vocab

log = logging.getLogger(__name__)


def clamp_beam(beam: int, k: int, num_items: int) -> tuple[int, int]:
    """(beam, k) that decoding can honour: a beam wider than the catalog is the catalog (logged)."""
    if beam > num_items:
        log.warning("beam %d is larger than the catalog (%d items): decoding with beam %d", beam, num_items,
                    num_items)
        beam = num_items
    return beam, min(k, beam)


@torch.no_grad()
def rank_histories(model: Recommender, history: Tensor, codes: Tensor, vocab: Vocab, index: PrefixIndex, *,
                   k: int, beam: int, method: str) -> Ranking:
    """The model's top-k items for each history (B, H) of item ids (-1 = padding), on the model's device.

    The one decoder behind `evaluate` (which scores the ranking) and `recommend` (which serves it), so
    both rank a given history identically. The caller sets eval mode and clamps the beam.
    """
    unused = torch.zeros(len(history), dtype=torch.long, device=history.device)  # (B,) no target needed
    batch = make_batch(Samples(unused, history, unused), codes, vocab)
    return recommend(model, batch.input_ids, batch.attention_mask, index, k=k, beam=beam, method=method)


@torch.no_grad()
def decode_ranks(model: Recommender, samples: Samples, codes: Tensor, vocab: Vocab, index: PrefixIndex, *,
                 k: int, beam: int, method: str, batch_size: int, device: torch.device,
                 description: str = "decoding") -> Tensor:
    """The 0-based rank of each sample's target in the model's top-k (metrics.MISS when absent)."""
    was_training = model.training
    model.eval()
    if method == "beam":
        beam, k = clamp_beam(beam, k, index.num_items)
    codes = codes.to(device)
    acc = MetricAccumulator()
    order = torch.argsort(samples.lengths(), stable=True)  # users of similar history length share a batch
    samples = samples.select(order)
    with Bar(-(-len(samples) // batch_size), description) as bar:
        for start in range(0, len(samples), batch_size):
            part = samples.select(torch.arange(start, min(start + batch_size, len(samples))))
            part = part.trim(max(1, int(part.lengths().max())))  # the batch's longest history, no more
            ranking = rank_histories(model, part.history.to(device), codes, vocab, index, k=k, beam=beam,
                                     method=method)
            acc.update(ranking.items.cpu(), part.target)
            bar.advance()
    model.train(was_training)
    rank = torch.empty_like(acc.rank)
    rank[order] = acc.rank  # back to the samples' order
    return rank
