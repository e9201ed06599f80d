"""The recommender of DESIGN.md section 1: a compact T5-style encoder-decoder over semantic-ID tokens,
built bottom-up. `RecommenderConfig` (recommender/config.py) is the whole contract; `hf_port.to_hf_t5` copies the weights into
Hugging Face's `T5ForConditionalGeneration` and gives the same logits.

    RecommenderNorm         x / rms(x) * w in fp32 (T5LayerNorm: no mean, no bias)
    RecommenderAttention    q, k, v, o without bias; softmax(q k^T + bias + mask) v with no 1/sqrt(dk):
                            T5 folds that scale into the init of q. One SDPA call, bias and mask as its
                            float attn_mask.
    RecommenderFeedForward  wo(dropout(relu(wi(x))))
    RecommenderBlock        x += drop(attn(norm(x)));  [decoder: x += drop(cross(norm(x)))];
                            x += drop(ffn(norm(x)))
    RecommenderStack        dropout(embeddings) -> blocks -> final norm -> dropout; owns the stack's
                            relative position bias, computed once per call and shared by its blocks
    Recommender             shared embedding (hard + soft, "mixed representation") -> encoder -> Memory
                            decoder over W candidate sequences per user (KV cache) -> untied lm_head

Shapes: B users, S history tokens, W candidate sequences per user, T decoder tokens (t with the cached
ones), H heads, dk = d_kv, D = d_model, L' tokens per item, L soft levels, K codes, V vocabulary.

The layers live in recommender/layers.py, with `second_order()`, the context the bi-level meta step's
second-order forward passes run under.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.layers import (
    RecommenderAttention,
    RecommenderFeedForward,
    RecommenderNorm,
    RecommenderStack,
    compute_dtype,
    masked_bias,
    relative_position_bucket,
    second_order,
)
from bloger_cli.recommender.vocab import SPECIAL

__all__ = ["DecoderCache", "Memory", "Recommender", "RecommenderOutput", "relative_position_bucket",
           "second_order"]  # the last two live in layers.py


class Memory(NamedTuple):
    """The encoder's output: what the decoder attends to."""

    hidden: Tensor  # (B, S, D)
    mask: Tensor  # (B, S) bool, True = real token


class RecommenderOutput(NamedTuple):
    logits: Tensor  # (B, T, V) float32
    loss: Tensor | None  # mean token cross-entropy over labels != -100


@dataclass(frozen=True)
class DecoderCache:
    """The decoder's keys and values so far, for incremental decoding. Immutable: `decode` and `reorder`
    return new caches, so a caller can keep an old one (and tests can branch from it)."""

    self_kv: tuple[tuple[Tensor, Tensor], ...]  # per decoder layer: keys, values (B*W, H, t, dk)
    cross_kv: tuple[tuple[Tensor, Tensor], ...]  # per decoder layer: keys, values (B, H, S, dk), once per user
    length: int  # t: tokens decoded so far

    @property
    def users(self) -> int:
        return self.cross_kv[0][0].shape[0]

    @property
    def width(self) -> int:
        """W: sequences per user."""
        return self.self_kv[0][0].shape[0] // self.users

    def reorder(self, index: Tensor) -> DecoderCache:
        """A new cache whose beam j of user b continues beam index[b, j] of the old one: index (B, W') long,
        W' may differ from W. Only the self-attention K/V move; the cross K/V stay one per user."""
        if index.dim() != 2 or index.shape[0] != self.users:
            raise ValueError(f"reorder index has shape {tuple(index.shape)}, the cache holds {self.users} users "
                             f"(expected ({self.users}, W'))")
        rows = torch.arange(self.users, device=index.device)[:, None]  # (B, 1)

        def pick(t: Tensor) -> Tensor:  # (B*W, H, t, dk) -> (B*W', H, t, dk)
            return t.unflatten(0, (self.users, -1))[rows, index].flatten(0, 1)

        return DecoderCache(tuple((pick(k), pick(v)) for k, v in self.self_kv), self.cross_kv, self.length)


class Recommender(nn.Module):
    def __init__(self, config: RecommenderConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # encoder and decoder tokens
        self.encoder = RecommenderStack(config, config.num_layers, decoder=False)
        self.decoder = RecommenderStack(config, config.decoder_layers, decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied, unscaled (T5 v1.1)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """HF `T5PreTrainedModel._init_weights` with factor 1.0 (Mesh TF's init): the query's std carries
        the 1/sqrt(dk) that attention leaves out."""
        c = self.config
        for module in self.modules():
            if isinstance(module, RecommenderNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RecommenderAttention):
                nn.init.normal_(module.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
                nn.init.normal_(module.k.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.v.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
            elif isinstance(module, RecommenderFeedForward):
                nn.init.normal_(module.wi.weight, std=c.d_model**-0.5)
                nn.init.normal_(module.wo.weight, std=c.d_ff**-0.5)
            elif isinstance(module, RecommenderStack):
                nn.init.normal_(module.relative_bias.weight, std=c.d_model**-0.5)
        nn.init.normal_(self.shared.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=1.0)

    # --- embeddings -----------------------------------------------------------------------------------

    def _soft(self, probs: Tensor, first_level: int = 0) -> Tensor:
        """(p_l - sg[p_l]) @ E_l for levels first_level.. of probs (..., n, K): (..., n, D), zero in value.

        One einsum over the (L', K, D) view of the code rows: never a (..., V) one-hot. The straight-through
        is on the probabilities, as in the official code: p gets E_l^T dL/de, while E_l's gradient keeps
        the value it has without probs (the hard rows only) and still depends on p in the graph, which is
        the second-order path of the meta step. (DESIGN.md's s - sg[s] with s = p_l @ E_l would add
        p_l^T dL/de to E_l's gradient: the recommender would train differently once probs are given.)
        """
        c = self.config
        rows = self.shared.weight[SPECIAL:SPECIAL + c.levels * c.codebook_size].view(
            c.levels, c.codebook_size, -1)  # (L', K, D)
        rows = rows[first_level:first_level + probs.shape[-2]]  # (n, K, D)
        probs = probs.to(rows.dtype)
        return torch.einsum("...lk,lkd->...ld", probs - probs.detach(), rows)  # (..., n, D)

    def embed(self, tokens: Tensor, probs: Tensor | None = None) -> Tensor:
        """Item-major tokens (..., T) -> (..., T, D): E[hard] + (s - sg[s]) on the first L levels of each
        item (token t is level t % L'), E[hard] alone elsewhere. probs (..., T // L', L, K) or None.
        The value is exactly the hard embedding; only the gradient sees probs."""
        x = self.shared(tokens)  # (..., T, D)
        if probs is None:
            return x
        c = self.config
        T = tokens.shape[-1]
        expected = (*tokens.shape[:-1], T // c.levels, c.soft_levels, c.codebook_size)
        if T % c.levels or tuple(probs.shape) != expected:
            raise ValueError(f"probs have shape {tuple(probs.shape)}, tokens {tuple(tokens.shape)} need "
                             f"{expected} (T a multiple of L' = {c.levels})")
        items = x.unflatten(-2, (T // c.levels, c.levels))  # (..., T/L', L', D)
        soft = items[..., :c.soft_levels, :] + self._soft(probs)  # (..., T/L', L, D)
        items = torch.cat([soft, items[..., c.soft_levels:, :]], dim=-2)  # levels >= L: no path to probs
        return items.flatten(-3, -2)  # (..., T, D)

    def _embed_target(self, tokens: Tensor, probs: Tensor | None, start: int) -> Tensor:
        """Decoder tokens (B, W, T) at positions start.. -> (B, W, T, D). Position p in 1..L holds level
        p - 1 of the target item ([PAD, c_0, .., c_{L'-1}]) and gets probs[:, :, p - 1] (B, W, L, K)."""
        x = self.shared(tokens)  # (B, W, T, D)
        if probs is None:
            return x
        c = self.config
        expected = (*tokens.shape[:2], c.soft_levels, c.codebook_size)
        if tuple(probs.shape) != expected:
            raise ValueError(f"decoder probs have shape {tuple(probs.shape)}, tokens {tuple(tokens.shape)} "
                             f"need {expected}")
        lo, hi = max(1, start), min(c.soft_levels + 1, start + tokens.shape[2])  # soft positions here
        if lo >= hi:
            return x
        a, b = lo - start, hi - start  # the same positions, relative to this call
        soft = x[:, :, a:b] + self._soft(probs[:, :, lo - 1:hi - 1], first_level=lo - 1)  # (B, W, b-a, D)
        return torch.cat([x[:, :, :a], soft, x[:, :, b:]], dim=2)

    # --- encoder and decoder --------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor, input_probs: Tensor | None = None) -> Memory:
        """input_ids (B, S) item-major history (pad where the mask is False), attention_mask (B, S),
        input_probs (B, S // L', L, K) or None -> Memory."""
        mask = attention_mask.bool()  # (B, S)
        x = self.embed(input_ids, input_probs)  # (B, S, D)
        S = input_ids.shape[1]
        self_mask = masked_bias(self.encoder.position_bias(S, S), mask[:, None, None, :], compute_dtype(x))  # (B, H, S, S)
        hidden, _ = self.encoder(x.unsqueeze(1), self_mask)  # (B, 1, S, D)
        return Memory(hidden.squeeze(1), mask)

    def decode(self, memory: Memory, tokens: Tensor, probs: Tensor | None = None,
               cache: DecoderCache | None = None, use_cache: bool = False) -> tuple[Tensor, DecoderCache | None]:
        """tokens (B, W, T): W candidate sequences per user -> hidden (B, W, T, D) after the final norm
        and dropout, and (use_cache) a new cache that also holds these T tokens (else None).

        With a cache the tokens continue its sequences at absolute positions cache.length.. (W must be
        the cache's width; `reorder` first to change it); the cross K/V come from the cache. probs
        (B, W, L, K) or None: the target item's soft assignments for decoder positions 1..L.
        """
        B, W, T = tokens.shape
        past = 0 if cache is None else cache.length
        if cache is not None and (cache.users, cache.width) != (B, W):
            raise ValueError(f"tokens have B={B}, W={W}, the cache B={cache.users}, W={cache.width}; "
                             "reorder the cache to the new beams first")
        x = self._embed_target(tokens, probs, past)  # (B, W, T, D)
        dtype = compute_dtype(x)
        query = torch.arange(T, device=tokens.device)[:, None] + past  # (T, 1) absolute positions
        causal = torch.arange(past + T, device=tokens.device)[None, :] <= query  # (T, t)
        self_mask = masked_bias(self.decoder.position_bias(T, past + T, offset=past), causal, dtype)  # (1, H, T, t)
        zero = torch.zeros((), device=tokens.device)  # no position bias in cross-attention
        cross_mask = masked_bias(zero, memory.mask[:, None, None, :], dtype)  # (B, 1, 1, S)
        if cache is None:  # each layer's cross K/V: (B, H, S, dk), once per user whatever W is
            cross_kv = tuple(block.cross_attn.keys_values(memory.hidden) for block in self.decoder.blocks)
        else:
            cross_kv = cache.cross_kv
        cross = [(k, v, cross_mask) for k, v in cross_kv]
        hidden, self_kv = self.decoder(x, self_mask, None if cache is None else cache.self_kv, cross)
        return hidden, DecoderCache(tuple(self_kv), cross_kv, past + T) if use_cache else None

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V) at least float32 (also under autocast, for a stable softmax)."""
        out = self.lm_head(hidden)
        return out.to(torch.promote_types(out.dtype, torch.float32))  # float64 models stay float64

    def forward(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor,
                labels: Tensor | None = None, *, input_probs: Tensor | None = None,
                decoder_probs: Tensor | None = None) -> RecommenderOutput:
        """input_ids, attention_mask (B, S); decoder_input_ids, labels (B, T) (-100 ignored);
        input_probs (B, S // L', L, K), decoder_probs (B, L, K) or None."""
        memory = self.encode(input_ids, attention_mask, input_probs)
        probs = None if decoder_probs is None else decoder_probs.unsqueeze(1)  # (B, 1, L, K)
        hidden, _ = self.decode(memory, decoder_input_ids.unsqueeze(1), probs)  # (B, 1, T, D)
        logits = self.logits(hidden.squeeze(1))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return RecommenderOutput(logits, loss)
