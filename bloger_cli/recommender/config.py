"""The recommender's config, on the lowest floor of recommender/ so that layers.py and model.py both
import it and never each other (as transformers keeps configuration_t5.py apart from modeling_t5.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bloger_cli.recommender.vocab import Vocab


@dataclass
class RecommenderConfig:
    """Everything that fixes the model's shapes (plain values: it goes into the checkpoint)."""

    levels: int  # L': tokens per item (tokenizer levels + an optional disambiguation level)
    codebook_size: int  # K
    soft_levels: int  # L: levels that can receive soft assignments (the tokenizer's); L' - L is 0 or 1
    d_model: int = 128
    num_layers: int = 4  # encoder layers
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 6
    d_kv: int = 64
    d_ff: int = 1024
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: `dropout` (T5 drops attention weights too)
    rel_buckets: int = 32
    rel_max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codebook_size < 1:
            raise ValueError(f"levels ({self.levels}) and codebook_size ({self.codebook_size}) must be >= 1")
        if self.levels - self.soft_levels not in (0, 1) or self.soft_levels < 1:
            raise ValueError(f"soft_levels ({self.soft_levels}) must be levels ({self.levels}) or levels - 1, "
                             "and at least 1")

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.levels, self.codebook_size)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
