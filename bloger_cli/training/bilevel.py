"""The tokenizer's side of modes joint and bilevel (DESIGN.md section 1): soft assignments of a batch,
the meta-gradient by one-step look-ahead, gradient surgery, and the joint loss. Pure functions, no I/O.

    bilevel, every tokenizer update (phi: tokenizer, theta: recommender):
      p = tokenizer.soft_assignments(x[distinct items of the batch])    mixed representation inputs
      theta' = theta - eta * grad_theta L_rec(theta, p)                 graph kept (create_graph)
      g_rec = grad_phi L_rec(theta', p)                                 second order, functional_call
      g_tok = grad_phi L_tok(x[distinct items of the batch])
      per tokenizer tensor: g_rec <- surgery(g_rec, g_tok); grad = lam * g_tok + g_rec

The look-ahead is a plain SGD step, as in the official code. L_tok counts each distinct item of the
batch once (the official code averages over every non-padding history and target slot, so an item
weighs as often as it occurs). Dropout: the model and the tokenizer run in whatever mode they are in
(the loop keeps both in train mode), so the inner and the outer forward pass draw different dropout
masks, as two ordinary steps would; call .eval() first for a deterministic step.

Nothing here keeps a graph past its return: the second-order graph is the largest object of the whole
run, and the official code's outlives the step (13.2 GiB, then 22.9 GiB for two steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bloger_cli.recommender.batch import Batch
from bloger_cli.recommender.model import Recommender, second_order

SURGERY = ("pcgrad", "none", "official")
Reduce = Callable[[list[Tensor]], None]  # sums tensors over data-parallel processes, in place


def distinct_items(history: Tensor, target: Tensor) -> Tensor:
    """The distinct items (U,), sorted, of histories (B, H; -1 = padding) and targets (B,)."""
    return torch.unique(torch.cat([history[history >= 0], target]))


def batch_items(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct items of a batch (U,) sorted, and the index into them of each history slot (B, H)
    and target (B,). Padding slots (-1) are left out of the items and point at row 0: mask them."""
    items = distinct_items(batch.history, batch.target)  # (U,)
    history = torch.searchsorted(items, batch.history.clamp_min(0))  # (B, H)
    return items, history, torch.searchsorted(items, batch.target)


def mixed_probs(tokenizer: nn.Module, embeddings: Tensor, batch: Batch, routing: str = "full") -> tuple[Tensor, Tensor]:
    """Soft assignments for the recommender's mixed representation, one tokenizer pass per distinct item.

    embeddings (N, D), row = item id -> input_probs (B, H, L, K), zero at padding slots (their tokens are
    masked PAD; zeros keep the padding out of the tokenizer's gradient), and decoder_probs (B, L, K).
    L is the tokenizer's levels: the recommender's soft_levels, without the disambiguation level.
    """
    return _mixed_probs(tokenizer, embeddings, batch, routing)[:2]


def _mixed_probs(tokenizer: nn.Module, embeddings: Tensor, batch: Batch,
                 routing: str = "full") -> tuple[Tensor, Tensor, Tensor]:
    """mixed_probs and the batch's distinct items (U,)."""
    items, history, target = batch_items(batch)
    p = tokenizer.soft_assignments(embeddings[items], routing)  # (U, L, K)
    present = (batch.history >= 0)[..., None, None]  # (B, H, 1, 1)
    return torch.where(present, p[history], 0.0), p[target], items  # (B, H, L, K), (B, L, K), (U,)


def rec_loss(model: Recommender, params: dict[str, Tensor], batch: Batch, probs: tuple[Tensor, Tensor]) -> Tensor:
    """L_rec of the batch with `params` in place of the model's own, through the mixed representation."""
    args = (batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.labels)
    return functional_call(model, params, args, {"input_probs": probs[0], "decoder_probs": probs[1]}).loss


def surgery(g_rec: Tensor, g_tok: Tensor, method: str) -> tuple[Tensor, float, bool]:
    """(g_rec', cos(g_rec, g_tok), fired) for one parameter tensor; fired: a projection was applied.

    All methods test the conflict <g_rec, g_tok> < 0 over the whole tensor, and none fires when g_tok
    is zero. pcgrad: g_rec - <g_rec, g_tok> / ||g_tok||^2 * g_tok, so <g_rec', g_tok> = 0.
    official (github.com/Ten-Mao/BLOGER, run_gr_rec_blo.py, train_epoch): u = F.normalize(g_tok, dim=-1),
    each row scaled to unit norm, and g_rec - <g_rec, u> * u. For a vector that is pcgrad; for a matrix
    it is no projection: a 256 x 32 codebook gradient at cosine -0.7 comes back ~180 times longer and
    nearly parallel to g_tok. none: g_rec as is (the cosine still says whether they conflict).
    """
    if method not in SURGERY:
        raise ValueError(f"surgery must be one of {', '.join(SURGERY)}, got {method!r}")
    dot = torch.sum(g_rec * g_tok)
    tok_norm = g_tok.norm()
    norms = g_rec.norm() * tok_norm
    cos = float(dot / norms) if norms > 0 else 0.0
    if method == "none" or dot >= 0 or tok_norm == 0:
        return g_rec, cos, False
    if method == "pcgrad":
        return g_rec - dot / tok_norm.pow(2) * g_tok, cos, True
    u = F.normalize(torch.atleast_1d(g_tok), p=2, dim=-1).view_as(g_tok)  # rows of unit norm (zero rows stay 0)
    return g_rec - torch.sum(g_rec * u) * u, cos, True


class MetaResult(NamedTuple):
    grads: dict[str, Tensor]  # per tokenizer parameter: lam * g_tok + g_rec' (detached)
    cosine: dict[str, float]  # cos(g_rec, g_tok) before surgery (0 where either is zero)
    fired: dict[str, bool]  # surgery projected g_rec
    inner_loss: float  # L_rec(theta, phi)
    outer_loss: float  # L_rec(theta', phi) on the meta batch
    tok_loss: float  # L_tok on the batch's distinct items

    @property
    def conflict_fraction(self) -> float:
        """The fraction of tokenizer tensors with <g_rec, g_tok> < 0 (whatever the surgery method)."""
        return sum(c < 0 for c in self.cosine.values()) / max(1, len(self.cosine))


def _lookahead_gradient(model: Recommender, tokenizer: nn.Module, embeddings: Tensor, batch: Batch,
                        meta_batch: Batch, eta: float, routing: str = "full") -> tuple[list[Tensor | None], float, float]:
    """grad_phi L_rec(theta - eta * grad_theta L_rec(theta, phi), phi) per tokenizer tensor (None where
    unused), and the inner and outer losses. Every graph built here is freed on return."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with second_order():  # the first-order grads are differentiated again: SDPA's math backend only
        probs = mixed_probs(tokenizer, embeddings, batch, routing)
        inner = rec_loss(model, params, batch, probs)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        lookahead = {name: p - eta * g for (name, p), g in zip(params.items(), grads)}
        outer_probs = probs if meta_batch is batch else mixed_probs(tokenizer, embeddings, meta_batch, routing)
        outer = rec_loss(model, lookahead, meta_batch, outer_probs)
        g_rec = torch.autograd.grad(outer, list(tokenizer.parameters()), allow_unused=True)  # no create_graph
    return list(g_rec), float(inner.detach()), float(outer.detach())


def _chunks(batch: Batch, size: int, share: float = 1.0) -> list[tuple[Batch, float]]:
    """Slices of at most `size` samples, each with its share of the batch's label tokens (times `share`):
    the batch's mean loss is the sum of the slices' mean losses times these weights."""
    total = int((batch.labels != -100).sum())
    parts = [Batch(*(t[start:start + size] for t in batch)) for start in range(0, len(batch.target), size)]
    return [(part, share * int((part.labels != -100).sum()) / total) for part in parts]  # not a float32 ratio


def _rng_state() -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def _lookahead_gradient_chunked(model: Recommender, tokenizer: nn.Module, embeddings: Tensor, batch: Batch,
                                meta_batch: Batch, eta: float, chunk: int, share: float = 1.0,
                                reduce: Reduce | None = None,
                                routing: str = "full") -> tuple[list[Tensor | None], float, float]:
    """The same gradient with the second-order graph of only `chunk` samples alive at a time.

    d/dphi L_out(theta'(phi), phi) = dL_out/dphi at theta' - eta * d/dphi [grad_theta L_in(theta, phi) . v],
    v = grad_theta' L_out: (1) grad_theta L_in by slices, first order; (2) v and the direct term at the
    fixed theta', by slices, first order; (3) the Hessian-vector term by slices, second order. Each
    slice of (3) replays the dropout masks its slice drew in (1).

    Data-parallel: this process holds `share` of the global batch; `reduce` sums over the processes
    the inner gradient (so theta' is the global look-ahead), v, and the tokenizer gradient.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    values, tok = list(params.values()), list(tokenizer.parameters())
    inner_grad = [torch.zeros_like(v) for v in values]
    losses = torch.zeros(2, dtype=values[0].dtype, device=values[0].device)  # inner, outer
    states = []
    for part, w in _chunks(batch, chunk, share):  # (1)
        states.append(_rng_state())
        loss = rec_loss(model, params, part, mixed_probs(tokenizer, embeddings, part, routing))
        for acc, g in zip(inner_grad, torch.autograd.grad(loss, values)):
            acc.add_(g, alpha=w)
        losses[0] += w * loss.detach()
    if reduce is not None:
        reduce(inner_grad)
    lookahead = {name: (p - eta * g).detach().requires_grad_() for (name, p), g in zip(params.items(), inner_grad)}
    v = [torch.zeros_like(p) for p in values]
    g_rec: list[Tensor | None] = [None] * len(tok)
    for part, w in _chunks(meta_batch, chunk, share):  # (2)
        loss = rec_loss(model, lookahead, part, mixed_probs(tokenizer, embeddings, part, routing))
        grads = torch.autograd.grad(loss, list(lookahead.values()) + tok, allow_unused=True)
        for acc, g in zip(v, grads[:len(v)]):
            acc.add_(g, alpha=w)
        g_rec = [_add(acc, g, w) for acc, g in zip(g_rec, grads[len(v):])]
        losses[1] += w * loss.detach()
    if reduce is not None:
        reduce(v)
    end = _rng_state()
    with second_order():
        for (part, w), state in zip(_chunks(batch, chunk, share), states):  # (3)
            _set_rng_state(state)
            loss = rec_loss(model, params, part, mixed_probs(tokenizer, embeddings, part, routing))
            grads = torch.autograd.grad(loss, values, create_graph=True)
            dot = sum(torch.sum(g * u) for g, u in zip(grads, v))
            hvp = torch.autograd.grad(dot, tok, allow_unused=True)
            g_rec = [_add(acc, g, -eta * w) for acc, g in zip(g_rec, hvp)]
    _set_rng_state(end)  # as if (3) drew nothing
    if reduce is not None:  # every process reaches the same tokenizer tensors
        g_rec = [torch.zeros_like(p) if g is None else g for g, p in zip(g_rec, tok)]
        reduce([*g_rec, losses])
    return g_rec, float(losses[0]), float(losses[1])


def _add(acc: Tensor | None, g: Tensor | None, weight: float) -> Tensor | None:
    if g is None:
        return acc
    return weight * g if acc is None else acc.add_(g, alpha=weight)


def meta_gradients(model: Recommender, tokenizer: nn.Module, embeddings: Tensor, batch: Batch, *, eta: float,
                   lam: float, surgery_method: str, meta_batch: Batch | None = None, chunk: int | None = None,
                   share: float = 1.0, reduce: Reduce | None = None, tok_items: Tensor | None = None,
                   routing: str = "full", tok_norm: str = "sum") -> MetaResult:
    """The bi-level tokenizer gradient of DESIGN.md section 1 for one batch (see the module docstring).

    The look-ahead step is taken on `batch`, the outer loss on `meta_batch` (default: `batch`), L_tok on
    `batch`'s distinct items (`tok_norm`: summed or averaged squared errors, `RQVAE.loss`); `routing`: how
    the soft assignments of levels >= 2 reach the tokenizer (`ResidualQuantizer.soft_probs`). `chunk`: at most this many samples in the second-order graph at a time
    (same result up to float rounding; None: the whole batch at once). Returns detached gradients only:
    set them as .grad and step. Neither model's .grad is touched. Tokenizer tensors L_rec does not reach
    (the decoder MLP) get lam * g_tok.

    Data-parallel (training/distributed.py): `batch` and `meta_batch` are this process's slices, `share`
    its share of the global batch, `reduce` sums tensors over the processes in place, and `tok_items`
    are the global batch's distinct items; every process returns the same gradients.
    """
    if surgery_method not in SURGERY:
        raise ValueError(f"surgery must be one of {', '.join(SURGERY)}, got {surgery_method!r}")
    target = batch if meta_batch is None else meta_batch
    whole = max(len(batch.target), len(target.target))
    if reduce is None and (chunk is None or chunk >= whole):
        g_rec, inner, outer = _lookahead_gradient(model, tokenizer, embeddings, batch, target, eta, routing)
    else:  # the same gradient, a fraction of the memory (benchmarks/bilevel_overhead.py)
        g_rec, inner, outer = _lookahead_gradient_chunked(model, tokenizer, embeddings, batch, target, eta,
                                                          chunk or whole, share, reduce, routing)
    tok = dict(tokenizer.named_parameters())
    items = batch_items(batch)[0] if tok_items is None else tok_items
    tok_loss = tokenizer.loss(embeddings[items], tok_norm)
    g_tok = torch.autograd.grad(tok_loss, list(tok.values()), allow_unused=True)
    out, cosine, fired = {}, {}, {}
    for (name, p), rec, own in zip(tok.items(), g_rec, g_tok):
        rec = torch.zeros_like(p) if rec is None else rec
        own = torch.zeros_like(p) if own is None else own
        rec, cosine[name], fired[name] = surgery(rec, own, surgery_method)
        out[name] = (lam * own + rec).detach()
    return MetaResult(out, cosine, fired, inner, outer, float(tok_loss.detach()))


def joint_loss(model: nn.Module, tokenizer: nn.Module, embeddings: Tensor, batch: Batch, lam: float,
               tok_items: Tensor | None = None, routing: str = "full",
               tok_norm: str = "sum") -> tuple[Tensor, Tensor, Tensor]:
    """(L_rec + lam * L_tok, L_rec, L_tok) of mode joint: both models in one graph, no look-ahead; the
    caller backpropagates the total into both. `model`: the recommender or its DDP wrapper; `tok_items`:
    the items of L_tok (default: the batch's distinct items)."""
    input_probs, decoder_probs, items = _mixed_probs(tokenizer, embeddings, batch, routing)
    rec = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.labels,
                input_probs=input_probs, decoder_probs=decoder_probs).loss
    tok = tokenizer.loss(embeddings[items if tok_items is None else tok_items], tok_norm)
    return rec + lam * tok, rec, tok
