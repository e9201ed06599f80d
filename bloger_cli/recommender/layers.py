"""The layers of the recommender (recommender/model.py): T5's RMS norm, attention through one SDPA call
with the relative position bias as its float mask, the feed-forward block, the pre-norm residual block
and the stack that owns the relative position bias. See model.py's docstring for the whole picture.

Second-order gradients (the bi-level meta step) need attention whose backward is differentiable again.
SDPA's math backend is; the fused CPU and CUDA kernels are not, and SDPA picks them whenever it can (on
CPU: when dropout is off and the mask needs no grad, as in cross-attention). Run the forward passes whose
gradients are taken with `create_graph=True` under `second_order()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bloger_cli.recommender.config import RecommenderConfig


@contextmanager
def second_order() -> Iterator[None]:
    """Restrict SDPA to its math backend, whose backward can be differentiated again (create_graph=True).

    Without it the fused kernels raise "derivative for ..._backward is not implemented" on the second
    backward. The math backend costs memory (it materialises the (., H, T, S) scores), so ordinary
    training leaves the choice to SDPA.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's bucketing of key - query distances (HF `T5Attention._relative_position_bucket`, from Mesh TF):
    half the buckets are exact small distances, the other half log-spaced up to max_distance; with
    bidirectional, the upper half of the buckets is for keys after the query; otherwise keys after the
    query share bucket 0 (the causal mask hides them anyway)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp: log(0) never reaches the small distances, which take the exact branch (same buckets as HF)
    large = max_exact + (torch.log(distance.clamp(min=max_exact).float() / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype SDPA computes in: the autocast dtype inside autocast, else x's. Masks are built in it,
    with that dtype's own minimum, so a bf16 mask never rounds finfo(float32).min to -inf."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def masked_bias(bias: Tensor, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Float attn_mask: the bias where keep, dtype's minimum elsewhere (as HF does: a row with no key
    left gets uniform weights, never NaN)."""
    return torch.where(keep, bias.to(dtype), torch.finfo(dtype).min)


class RecommenderNorm(nn.Module):
    """RMSNorm as T5LayerNorm: scale only, no mean subtraction, no bias, in fp32 (also under autocast)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 up; float64 stays
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class RecommenderAttention(nn.Module):
    """Multi-head attention without biases or score scaling; the caller supplies K/V and the mask."""

    def __init__(self, config: RecommenderConfig) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.dropout = config.dropout if config.attention_dropout is None else config.attention_dropout

    def split(self, x: Tensor) -> Tensor:
        """(N, T, H*dk) -> (N, H, T, dk)."""
        return x.unflatten(-1, (self.heads, self.d_kv)).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, D) -> keys and values, each (N, H, T, dk)."""
        return self.split(self.k(x)), self.split(self.v(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (N, H, Tq, dk), k and v (N, H, Tk, dk), mask broadcastable to (N, H, Tq, Tk) -> (N, Tq, D)."""
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)  # (N, H, Tq, dk)
        return self.o(out.transpose(1, 2).flatten(2))  # (N, Tq, D)


class RecommenderFeedForward(nn.Module):
    def __init__(self, config: RecommenderConfig) -> None:
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


class RecommenderBlock(nn.Module):
    """One pre-norm layer over x (B, W, T, D): W sequences per user (W = 1 in the encoder).

    Self-attention runs per sequence on (B*W, H, T, dk). Cross-attention gathers each user's W*T queries
    into one (B, H, W*T, dk) row against that user's (B, H, S, dk) keys, so encoder states are never
    copied W times.
    """

    def __init__(self, config: RecommenderConfig, cross: bool) -> None:
        super().__init__()
        self.self_norm = RecommenderNorm(config.d_model, config.eps)
        self.self_attn = RecommenderAttention(config)
        if cross:
            self.cross_norm = RecommenderNorm(config.d_model, config.eps)
            self.cross_attn = RecommenderAttention(config)
        self.ffn_norm = RecommenderNorm(config.d_model, config.eps)
        self.ffn = RecommenderFeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, self_mask: Tensor, past: tuple[Tensor, Tensor] | None = None,
                cross: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, W, T, D); self_mask broadcastable to (B*W, H, T, t); past: cached keys and values, each
        (B*W, H, t - T, dk); cross: keys, values (B, H, S, dk) and mask (B, 1, 1, S).
        Returns x (B, W, T, D) and this layer's self-attention keys and values (B*W, H, t, dk)."""
        B, W, T, D = x.shape
        h = self.self_norm(x).flatten(0, 1)  # (B*W, T, D)
        q = self.self_attn.split(self.self_attn.q(h))  # (B*W, H, T, dk)
        k, v = self.self_attn.keys_values(h)  # (B*W, H, T, dk)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B*W, H, t, dk)
        x = x + self.dropout(self.self_attn.attend(q, k, v, self_mask).view(B, W, T, D))
        if cross is not None:
            h = self.cross_norm(x).flatten(1, 2)  # (B, W*T, D)
            q = self.cross_attn.split(self.cross_attn.q(h))  # (B, H, W*T, dk)
            x = x + self.dropout(self.cross_attn.attend(q, *cross).view(B, W, T, D))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, (k, v)


class RecommenderStack(nn.Module):
    """The encoder (bidirectional position bias) or the decoder (causal, with cross-attention)."""

    def __init__(self, config: RecommenderConfig, num_layers: int, decoder: bool) -> None:
        super().__init__()
        # HF keeps this table in block 0's self-attention ("has_relative_attention_bias") and hands the
        # bias it computes to the other blocks; same math, kept here where it is used
        self.relative_bias = nn.Embedding(config.rel_buckets, config.num_heads)
        self.blocks = nn.ModuleList([RecommenderBlock(config, cross=decoder) for _ in range(num_layers)])
        self.final_norm = RecommenderNorm(config.d_model, config.eps)
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = decoder
        self.buckets, self.max_distance = config.rel_buckets, config.rel_max_distance

    def position_bias(self, queries: int, keys: int, offset: int = 0) -> Tensor:
        """(1, H, Tq, Tk) for queries at positions offset.. against keys at positions 0..keys-1."""
        device = self.relative_bias.weight.device
        query = torch.arange(queries, device=device) + offset  # (Tq,)
        key = torch.arange(keys, device=device)  # (Tk,)
        buckets = relative_position_bucket(key[None, :] - query[:, None], not self.decoder, self.buckets,
                                           self.max_distance)  # (Tq, Tk)
        return self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)

    def forward(self, x: Tensor, self_mask: Tensor, past: tuple[tuple[Tensor, Tensor], ...] | None = None,
                cross: list[tuple[Tensor, Tensor, Tensor]] | None = None,
                ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """x (B, W, T, D) -> (B, W, T, D) after the final norm and dropout, and each layer's K/V."""
        x = self.dropout(x)
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block(x, self_mask, None if past is None else past[i], None if cross is None else cross[i])
            kv.append(layer_kv)
        return self.dropout(self.final_norm(x)), kv
