"""The token vocabulary of the recommender: pad, eos, then one block of K tokens per semantic-ID level.

    token 0            pad (also the decoder start token, as in T5)
    token 1            eos
    2 + l*K + c        code c of level l (l = 0..L'-1, L' = tokenizer levels + the disambiguation level)

Every item is exactly L' tokens, so a history of H items is H*L' tokens and the token at position t of
an item-major layout belongs to level t % L'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAD = 0
EOS = 1
SPECIAL = 2  # tokens before the first code block


@dataclass(frozen=True)
class Vocab:
    levels: int  # L': tokens per item (tokenizer levels, plus one when IDs are disambiguated)
    codebook_size: int  # K: codes per level (the disambiguation level also has K)

    @property
    def size(self) -> int:
        return SPECIAL + self.levels * self.codebook_size

    def offset(self, level: int) -> int:
        """The token id of code 0 of `level`."""
        return SPECIAL + level * self.codebook_size

    def block(self, level: int) -> slice:
        """The token ids of `level`'s codes, as a slice of the vocabulary."""
        return slice(self.offset(level), self.offset(level) + self.codebook_size)

    def tokens(self, codes: Tensor) -> Tensor:
        """Codes (..., L') -> token ids (..., L') int64."""
        if codes.shape[-1] != self.levels:
            raise ValueError(f"codes have {codes.shape[-1]} levels, the vocabulary {self.levels}")
        offsets = SPECIAL + torch.arange(self.levels, device=codes.device) * self.codebook_size  # (L',)
        return codes.long() + offsets

    def codes(self, tokens: Tensor) -> Tensor:
        """Token ids (..., L') of code tokens -> codes (..., L') int64 (the inverse of `tokens`)."""
        offsets = SPECIAL + torch.arange(tokens.shape[-1], device=tokens.device) * self.codebook_size
        return tokens.long() - offsets
