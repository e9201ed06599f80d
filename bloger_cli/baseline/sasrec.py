"""SASRec (Kang & McAuley, ICDM 2018, arXiv 1808.09781): causal self-attention over the item history.

Built bottom-up as RecBole 1.2.1's `SASRec` (the implementation the accuracy check compares with):
item + learned position embeddings, LayerNorm, dropout, then post-LN blocks (attention -> dropout ->
residual -> LayerNorm; GELU feed-forward -> dropout -> residual -> LayerNorm). The user state is the
hidden state at the last real item of the history; the scores of all items are its dot products with
the (tied) item embeddings, trained with cross-entropy over the whole catalog (the "CE" loss that
makes SASRec a strong baseline; the paper's binary loss with one sampled negative is weaker).

Histories are left-aligned (padding after the last item, as RecBole and `data/samples.Samples` hold
them), so with `is_causal` attention a real position only ever sees real, earlier items: no padding
mask is needed, and SDPA can take its fused causal kernel. Padded positions compute garbage nobody
reads; the user state is gathered at the last real item.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bloger_cli.baseline.config import SASRecConfig


class SASRecOutput(NamedTuple):
    state: Tensor  # (B, D) the hidden state at the newest item
    logits: Tensor  # (B, N) a score per item


class SASRecAttention(nn.Module):
    """Multi-head causal self-attention through torch SDPA."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = cfg.attention_dropout if cfg.attention_dropout is not None else cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, D)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class SASRecBlock(nn.Module):
    """Post-LN transformer block, as RecBole's TransformerLayer."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.attention = SASRecAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.ff = nn.Sequential(nn.Linear(cfg.hidden, cfg.inner), nn.GELU(), nn.Linear(cfg.inner, cfg.hidden))
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        return self.norm2(x + self.dropout(self.ff(x)))


class SASRec(nn.Module):
    """Next-item scores over `num_items` items from histories of at most `max_len` items."""

    def __init__(self, cfg: SASRecConfig, num_items: int, max_len: int) -> None:
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.item = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=num_items)  # last row: padding
        self.position = nn.Embedding(max_len, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.layers))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        """RecBole's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, history: Tensor) -> SASRecOutput:
        """history: (B, H) item ids, left-aligned, -1 after the last item (data/samples.Samples)."""
        if history.shape[1] > self.max_len:
            raise ValueError(f"history has {history.shape[1]} positions, the model was built for {self.max_len}")
        present = history >= 0  # (B, T)
        length = present.sum(dim=1)  # (B,)
        trim = max(int(length.max()), 1)  # batches are only as long as their longest history
        present, history = present[:, :trim], history[:, :trim]  # (B, T)
        positions = torch.arange(trim, device=history.device)  # (T,)
        x = self.item(history.masked_fill(~present, self.num_items)) + self.position(positions)  # (B, T, D)
        x = self.dropout(self.norm(x))
        for block in self.blocks:
            x = block(x)
        last = (length - 1).clamp_min(0)  # (B,) an empty history reads position 0 (the padding embedding)
        state = x[torch.arange(len(x), device=x.device), last]  # (B, D)
        return SASRecOutput(state, state @ self.item.weight[: self.num_items].T)  # (B, N)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["SASRec", "SASRecBlock", "SASRecOutput", "num_parameters"]
