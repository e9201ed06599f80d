"""Decoding: constrained beam search over the catalog's semantic IDs, and an exact scorer (DESIGN section 3).

The constraint is a prefix tree on tensors (`PrefixIndex`): per level, a CSR table from each valid
prefix to its allowed next codes, so a decoding step is one scatter into a (B*W, K) mask and one top-k
over W*K candidates per user, with no Python callback per token. Sequences map back to item ids
one-to-one, so metrics are computed on items, never on code strings.

Scores are sums over an item's L' code positions of full-vocabulary log-probabilities (the mask is
applied after log_softmax and never renormalised; EOS is not scored), so beam search and the exact
scorer rank on the same scale and agree whenever the beam is wide enough to keep every prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bloger_cli.errors import DataError
from bloger_cli.recommender.model import Memory, Recommender
from bloger_cli.recommender.vocab import PAD

# Logit elements (B x items x L' x V) one exact-scoring call may hold: 2**26 float32 is 256 MiB.
EXACT_BUDGET = 2 ** 26


class Ranking(NamedTuple):
    items: Tensor  # (B, k) int64 item ids, best first; -1 where fewer than k valid items
    scores: Tensor  # (B, k) float32 summed log-probabilities; -inf where items is -1


@dataclass(frozen=True)
class PrefixIndex:
    """The valid semantic IDs as a prefix tree of dense group ids, one CSR table per level.

    Level l maps prefixes of length l (groups 0..G_l-1; level 0 has only the root, group 0) to their
    children, the prefixes of length l+1. Children are numbered in sorted (parent, code) order, so a
    group's children are contiguous and the child of CSR entry j is group j of level l+1: the table
    needs no separate child column. Memory is O(N * L').
    """

    keys: list[Tensor]  # per level: (G_{l+1},) int64 sorted parent * K + code, one per child group
    next_codes: list[Tensor]  # per level: (G_{l+1},) int64 the code of each child (keys % K)
    indptr: list[Tensor]  # per level: (G_l + 1,) int64 children of group g are keys[indptr[g]:indptr[g+1]]
    group_items: Tensor  # (N,) int64 item id of each full-length group
    codes: Tensor  # (N, L') int64 the catalog's codes in the order given to `build`
    item_ids: Tensor  # (N,) int64 the item id of each row of `codes`
    codebook_size: int  # K

    @classmethod
    def build(cls, codes: Tensor, item_ids: Tensor, codebook_size: int | None = None) -> PrefixIndex:
        """From codes (N, L') and item ids (N,); K defaults to the largest code + 1.

        Sorting (torch.unique) does the work, one pass per level: nothing loops over items.
        """
        if codes.dim() != 2 or codes.shape[1] == 0:
            raise ValueError(f"codes must be (items, levels) with levels >= 1, got shape {tuple(codes.shape)}")
        if item_ids.shape != codes.shape[:1]:
            raise ValueError(f"item_ids have shape {tuple(item_ids.shape)}, codes {tuple(codes.shape)}")
        n, levels = codes.shape
        if n == 0:
            raise DataError("the catalog has no items to decode", hint="check the tokenize stage's output")
        codes, item_ids = codes.long(), item_ids.long()
        k = int(codes.max()) + 1 if codebook_size is None else codebook_size
        if int(codes.min()) < 0 or int(codes.max()) >= k:
            raise DataError(f"codes range over {int(codes.min())}..{int(codes.max())}, outside the codebook "
                            f"0..{k - 1}", hint="build the index with the tokenizer's codebook size")
        if len(torch.unique(item_ids)) != n:
            raise DataError(f"item ids are not unique ({n - len(torch.unique(item_ids))} repeated)",
                            hint="give each catalog row its own item id")
        keys, next_codes, indptr = [], [], []
        group = torch.zeros(n, dtype=torch.int64, device=codes.device)  # (N,) each item's prefix group
        num_groups = 1
        for level in range(levels):
            # group < N and K < 2**15, so the key stays far below 2**63 even for 10^9 items
            key, group = torch.unique(group * k + codes[:, level], sorted=True, return_inverse=True)
            counts = torch.bincount(key // k, minlength=num_groups)  # (G_l,) children per parent
            keys.append(key)
            next_codes.append(key % k)
            indptr.append(F.pad(torch.cumsum(counts, 0), (1, 0)))
            num_groups = len(key)
        if num_groups < n:
            raise cls._duplicate_error(codes, item_ids, group)
        group_items = torch.empty(n, dtype=torch.int64, device=codes.device)
        group_items[group] = item_ids
        return cls(keys, next_codes, indptr, group_items, codes, item_ids, k)

    @staticmethod
    def _duplicate_error(codes: Tensor, item_ids: Tensor, group: Tensor) -> DataError:
        counts = torch.bincount(group)
        shared = int((counts[group] > 1).sum())
        first = (counts[group] > 1).nonzero()[0, 0]
        pair = item_ids[group == group[first]][:2].tolist()
        return DataError(
            f"{shared} items share their semantic ID with another item (e.g. items {pair[0]} and {pair[1]} "
            f"both have {tuple(codes[first].tolist())}); decoding needs IDs that map one-to-one to items",
            hint="run `bloger tokenize` with disambiguation on (`--set disambiguate=true`, the default)")

    @property
    def levels(self) -> int:
        return self.codes.shape[1]

    @property
    def num_items(self) -> int:
        return self.codes.shape[0]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> PrefixIndex:
        def move(tensors: list[Tensor]) -> list[Tensor]:
            return [t.to(device) for t in tensors]

        return PrefixIndex(move(self.keys), move(self.next_codes), move(self.indptr), self.group_items.to(device),
                           self.codes.to(device), self.item_ids.to(device), self.codebook_size)

    def allowed(self, level: int, groups: Tensor) -> Tensor:
        """Groups (M,) of prefixes of length `level` -> (M, K) bool: the codes that may come next."""
        starts = self.indptr[level][groups]  # (M,)
        counts = self.indptr[level][groups + 1] - starts  # (M,)
        rows = torch.repeat_interleave(torch.arange(len(groups), device=groups.device), counts)  # (E,)
        # position of each entry in the CSR: the row's start plus its rank within the row
        rank = torch.arange(len(rows), device=groups.device) - (torch.cumsum(counts, 0) - counts)[rows]
        mask = torch.zeros(len(groups), self.codebook_size, dtype=torch.bool, device=groups.device)
        mask[rows, self.next_codes[level][starts[rows] + rank]] = True
        return mask

    def advance(self, level: int, groups: Tensor, codes: Tensor) -> Tensor:
        """Groups (M,) at `level` and their next codes (M,) -> child groups (M,) at level + 1, -1 if invalid."""
        keys = self.keys[level]
        wanted = groups * self.codebook_size + codes  # (M,)
        pos = torch.searchsorted(keys, wanted).clamp_(max=len(keys) - 1)  # (M,) sorted keys: a binary search
        return torch.where(keys[pos] == wanted, pos, -1)

    def items(self, groups: Tensor) -> Tensor:
        """Groups (...) of full-length prefixes (after the last level) -> item ids (...)."""
        return self.group_items[groups]


@torch.no_grad()
def beam_search(model: Recommender, memory: Memory, index: PrefixIndex, beam: int, k: int) -> Ranking:
    """The k best items per user found by constrained beam search with `beam` beams (k <= beam).

    Beams start at W = 1 so no two beams share a prefix, hence no item is returned twice. When a user
    has fewer valid prefixes than beams, the surplus beams score -inf: they follow group 0 harmlessly
    and come back as -1. The caller sets eval mode; the model's mode is left as it is.
    """
    vocab = model.config.vocab
    _check(index, vocab.levels, vocab.codebook_size, memory.hidden.device)
    if not 1 <= k <= beam:
        raise ValueError(f"need 1 <= k <= beam, got k={k} and beam={beam}")
    batch, width = memory.hidden.shape[0], vocab.codebook_size
    device = memory.hidden.device
    tokens = torch.full((batch, 1, 1), PAD, dtype=torch.long, device=device)  # (B, W=1, T=1) start token
    hidden, cache = model.decode(memory, tokens, use_cache=True)  # (B, 1, 1, D)
    groups = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, W) each beam's prefix group
    scores = torch.zeros(batch, 1, device=device)  # (B, W)
    for level in range(vocab.levels):
        beams = groups.shape[1]
        logp = torch.log_softmax(model.logits(hidden[:, :, -1]).float(), dim=-1)[..., vocab.block(level)]  # (B, W, K)
        allowed = index.allowed(level, groups.flatten())  # (B*W, K') with K' <= K
        allowed = F.pad(allowed, (0, width - allowed.shape[1])).view(batch, beams, width)  # (B, W, K)
        candidates = scores.unsqueeze(-1) + logp.masked_fill(~allowed, float("-inf"))  # (B, W, K)
        scores, flat = candidates.flatten(1).topk(min(beam, beams * width), dim=1)  # (B, W'), sorted
        parent, code = flat // width, flat % width  # (B, W')
        valid = scores > float("-inf")  # (B, W') False: fewer valid prefixes than beams
        child = index.advance(level, groups.gather(1, parent).flatten(), code.flatten()).view_as(code)
        groups = torch.where(valid, child, 0)
        if level + 1 < vocab.levels:
            cache = cache.reorder(parent)
            step = (code + vocab.offset(level)).unsqueeze(-1)  # (B, W', 1) the chosen code's token
            hidden, cache = model.decode(memory, step, cache=cache, use_cache=True)  # (B, W', 1, D)
    items = torch.where(valid, index.items(groups), -1)  # (B, W)
    return _pad(Ranking(items[:, :k], scores[:, :k]), k)


@torch.no_grad()
def exact_scores(model: Recommender, memory: Memory, index_or_codes: PrefixIndex | Tensor,
                 chunk: int | None = None) -> Tensor:
    """(B, N) float32: every item's summed log-probability under teacher forcing, items in catalog order.

    Each decode call scores `chunk` items for every user at once (W = chunk candidates sharing the
    user's encoder states); the default keeps one call's logits under EXACT_BUDGET elements.
    """
    vocab = model.config.vocab
    codes = index_or_codes.codes if isinstance(index_or_codes, PrefixIndex) else index_or_codes
    codes = codes.to(memory.hidden.device)
    if codes.dim() != 2 or codes.shape[1] != vocab.levels:
        raise ValueError(f"codes have shape {tuple(codes.shape)}, the model decodes {vocab.levels} levels")
    batch, levels = memory.hidden.shape[0], vocab.levels
    chunk = chunk or max(1, EXACT_BUDGET // (batch * levels * vocab.size))
    targets = vocab.tokens(codes)  # (N, L') the token each position must predict
    inputs = F.pad(targets[:, :-1], (1, 0), value=PAD)  # (N, L') [start, c_0, ..., c_{L'-2}]
    out = []
    for start in range(0, len(codes), chunk):
        tokens = inputs[start:start + chunk].expand(batch, -1, -1).contiguous()  # (B, W, L')
        hidden, _ = model.decode(memory, tokens)  # (B, W, L', D)
        logits = model.logits(hidden).float()  # (B, W, L', V)
        target = targets[start:start + chunk].expand(batch, -1, -1).unsqueeze(-1)  # (B, W, L', 1)
        # log_softmax at the target without materialising a second (B, W, L', V) tensor
        logp = logits.gather(-1, target).squeeze(-1) - logits.logsumexp(dim=-1)  # (B, W, L')
        out.append(logp.sum(dim=-1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def exact_topk(model: Recommender, memory: Memory, index: PrefixIndex, k: int,
               chunk: int | None = None) -> Ranking:
    """The k best items of the whole catalog per user by exact score; ties go to the earlier catalog row."""
    _check(index, model.config.vocab.levels, model.config.vocab.codebook_size, memory.hidden.device)
    if k < 1:
        raise ValueError(f"need k >= 1, got k={k}")
    scores = exact_scores(model, memory, index, chunk)  # (B, N)
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)  # stable: ties keep row order
    return _pad(Ranking(index.item_ids[order[:, :k]], scores[:, :k]), k)


@torch.no_grad()
def recommend(model: Recommender, input_ids: Tensor, attention_mask: Tensor, index: PrefixIndex, *, k: int,
              beam: int = 20, method: Literal["beam", "exact"] = "beam") -> Ranking:
    """Encode users' histories (B, S) and return their top-k items by beam search or exact scoring."""
    memory = model.encode(input_ids, attention_mask)
    if method == "beam":
        return beam_search(model, memory, index, beam=beam, k=k)
    if method == "exact":
        return exact_topk(model, memory, index, k)
    raise ValueError(f"method must be 'beam' or 'exact', got {method!r}")


def _check(index: PrefixIndex, levels: int, codebook_size: int, device: torch.device) -> None:
    if index.levels != levels or index.codebook_size > codebook_size:
        raise ValueError(f"the index has {index.levels} levels of {index.codebook_size} codes, the model "
                         f"{levels} levels of {codebook_size}; rebuild the index from the model's catalog")
    if index.device != device:
        raise ValueError(f"the index is on {index.device}, the encoder states on {device}; "
                         f"call index.to(device) once before decoding")


def _pad(ranking: Ranking, k: int) -> Ranking:
    """Pad (B, k') to (B, k) with -1 / -inf when fewer than k candidates exist."""
    missing = k - ranking.items.shape[1]
    if missing <= 0:
        return ranking
    return Ranking(F.pad(ranking.items, (0, missing), value=-1),
                   F.pad(ranking.scores, (0, missing), value=float("-inf")))
