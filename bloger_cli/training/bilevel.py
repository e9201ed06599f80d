"""The tokenizer's side of modes joint and bilevel (DESIGN.md section 1): soft assignments of a batch,
the meta-gradient by one-step look-ahead, gradient surgery, and the refresh of every item's codes.

    bilevel, every tokenizer update:
      p = tokenizer.soft_assignments(x[items of the batch])           mixed representation inputs
      theta' = theta - eta * grad_theta L_rec(theta, p)               graph kept (create_graph)
      g_rec = grad_phi L_rec(theta', p)                               second order, functional_call
      g_tok = grad_phi L_tok(x[items of the batch])
      per tokenizer tensor: g_rec <- surgery(g_rec, g_tok); grad = lam * g_tok + g_rec

Nothing here keeps a graph past its return: the meta step's second-order graph is the largest object
of the whole run, and the official code's outlives the step (13.2 GiB, then 22.9 GiB for two steps).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bloger_cli.recommender.model import Recommender, second_order
from bloger_cli.training.data import Batch

SURGERY = ("pcgrad", "none", "official")


def batch_items(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct items of a batch (U,), and the index into them of each history slot (B, H) and
    target (B,); padding slots (-1) point at any item and are masked by the caller."""
    b, h = batch.history.shape
    items, inverse = torch.unique(torch.cat([batch.history.clamp_min(0).flatten(), batch.target]),
                                  return_inverse=True)
    return items, inverse[:b * h].view(b, h), inverse[b * h:]


def mixed_probs(tokenizer: nn.Module, embeddings: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Soft assignments for the recommender's mixed representation, computed once per distinct item.

    embeddings (N, D) -> input_probs (B, H, L, K) (zeros at padding slots), decoder_probs (B, L, K),
    and the batch's distinct items (U,)."""
    items, hist, target = batch_items(batch)
    p = tokenizer.soft_assignments(embeddings[items])  # (U, L, K)
    present = (batch.history >= 0)[..., None, None].to(p.dtype)  # (B, H, 1, 1)
    return p[hist] * present, p[target], items


def rec_loss(model: Recommender, params: dict[str, Tensor], batch: Batch, probs: tuple[Tensor, Tensor]) -> Tensor:
    """L_rec of the batch with `params` in place of the model's own, through the mixed representation."""
    args = (batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.labels)
    return functional_call(model, params, args, {"input_probs": probs[0], "decoder_probs": probs[1]}).loss


def surgery(g_rec: Tensor, g_tok: Tensor, method: str) -> tuple[Tensor, float, bool]:
    """(g_rec', cos(g_rec, g_tok), whether g_rec was changed) for one parameter tensor.

    pcgrad: when <g_rec, g_tok> < 0, remove g_rec's component along g_tok over the flattened tensor,
    so that <g_rec', g_tok> = 0. official: the same test, but divided by the squared norm of each row of
    g_tok (dim -1) instead of the whole tensor's, as the paper's code does; for a matrix that is no
    projection (it can point g_rec' along g_tok and multiply its norm). none: g_rec unchanged.
    """
    dot = torch.sum(g_rec * g_tok)
    norms = g_rec.norm() * g_tok.norm()
    cos = float(dot / norms) if norms > 0 else 0.0
    if method == "none" or dot >= 0 or g_tok.norm() == 0:
        return g_rec, cos, False
    if method == "pcgrad":
        return g_rec - dot / g_tok.pow(2).sum() * g_tok, cos, True
    if method == "official":
        rows = g_tok.pow(2).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(g_tok.dtype).tiny)
        return g_rec - dot / rows * g_tok, cos, True
    raise ValueError(f"surgery must be one of {', '.join(SURGERY)}, got {method!r}")


class MetaResult(NamedTuple):
    grads: dict[str, Tensor]  # per tokenizer parameter: lam * g_tok + g_rec' (detached)
    cosine: dict[str, float]  # cos(g_rec, g_tok) before surgery
    fired: dict[str, bool]  # surgery changed g_rec
    inner_loss: float  # L_rec(theta, phi)
    outer_loss: float  # L_rec(theta', phi)
    tok_loss: float  # L_tok on the batch's items

    @property
    def conflict_fraction(self) -> float:
        return sum(c < 0 for c in self.cosine.values()) / max(1, len(self.cosine))


def meta_gradients(model: Recommender, tokenizer: nn.Module, embeddings: Tensor, batch: Batch, *, eta: float,
                   lam: float, surgery_method: str, meta_batch: Batch | None = None) -> MetaResult:
    """The bi-level tokenizer gradient of DESIGN.md section 1 for one batch (see the module docstring)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tok = dict(tokenizer.named_parameters())
    with second_order():
        probs = mixed_probs(tokenizer, embeddings, batch)
        inner = rec_loss(model, params, batch, probs[:2])
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        lookahead = {name: p - eta * g for (name, p), g in zip(params.items(), grads)}
        target = batch if meta_batch is None else meta_batch
        target_probs = probs if meta_batch is None else mixed_probs(tokenizer, embeddings, meta_batch)
        outer = rec_loss(model, lookahead, target, target_probs[:2])
        g_rec = torch.autograd.grad(outer, list(tok.values()), allow_unused=True)
    inner_value, outer_value = float(inner.detach()), float(outer.detach())
    del grads, lookahead, outer, inner, probs, target_probs  # the second-order graph ends here
    tok_loss = tokenizer(embeddings[batch_items(batch)[0]]).losses.total
    g_tok = torch.autograd.grad(tok_loss, list(tok.values()), allow_unused=True)
    out, cosine, fired = {}, {}, {}
    for (name, p), rec, own in zip(tok.items(), g_rec, g_tok):
        rec = torch.zeros_like(p) if rec is None else rec.detach()
        own = torch.zeros_like(p) if own is None else own.detach()
        rec, cosine[name], fired[name] = surgery(rec, own, surgery_method)
        out[name] = lam * own + rec
    return MetaResult(out, cosine, fired, inner_value, outer_value, float(tok_loss.detach()))


def joint_loss(model: Recommender, tokenizer: nn.Module, embeddings: Tensor, batch: Batch,
               lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """(L_rec + lam * L_tok, L_rec, L_tok) of mode joint: both models in one graph, no look-ahead."""
    input_probs, decoder_probs, items = mixed_probs(tokenizer, embeddings, batch)
    rec = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.labels,
                input_probs=input_probs, decoder_probs=decoder_probs).loss
    tok = tokenizer(embeddings[items]).losses.total
    return rec + lam * tok, rec, tok
