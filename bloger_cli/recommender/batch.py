"""Batches of tokens built from samples with tensor ops.

A batch gathers the current semantic IDs of its items, so when the tokenizer changes the IDs (bi-level
modes) nothing is re-read: the next batch simply gathers from the new code table.

    history (B, H) item ids, -1 = padding --codes (N, L')--> input_ids (B, H*L') item-major tokens
    target (B,) item id                    --codes--------> decoder_input_ids [PAD, c_0..c_{L'-1}] (B, L'+1)
                                                            labels            [c_0..c_{L'-1}, EOS]  (B, L'+1)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bloger_cli.data.samples import Samples
from bloger_cli.recommender.vocab import EOS, PAD, Vocab


class Batch(NamedTuple):
    input_ids: Tensor  # (B, H*L') history tokens, PAD where attention_mask is False
    attention_mask: Tensor  # (B, H*L') bool
    decoder_input_ids: Tensor  # (B, L'+1)
    labels: Tensor  # (B, L'+1)
    history: Tensor  # (B, H) item ids (-1 = padding): the bi-level modes look up soft assignments by these
    target: Tensor  # (B,)


def make_batch(samples: Samples, codes: Tensor, vocab: Vocab) -> Batch:
    """Tokens for a batch of samples from the code table (N, L') on the batch's device; no Python per sample."""
    history, target = samples.history, samples.target  # (B, H), (B,)
    b, h = history.shape
    present = history >= 0  # (B, H)
    tokens = vocab.tokens(codes[history.clamp_min(0)])  # (B, H, L')
    mask = present.unsqueeze(2).expand(b, h, vocab.levels)  # (B, H, L')
    input_ids = tokens.masked_fill(~mask, PAD).reshape(b, h * vocab.levels)  # (B, H*L')
    target_tokens = vocab.tokens(codes[target])  # (B, L')
    start = torch.full((b, 1), PAD, dtype=torch.long, device=target.device)
    eos = torch.full((b, 1), EOS, dtype=torch.long, device=target.device)
    return Batch(input_ids, mask.reshape(b, -1), torch.cat([start, target_tokens], dim=1),
                 torch.cat([target_tokens, eos], dim=1), history, target)
