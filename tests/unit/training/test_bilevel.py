"""The mathematics of the bi-level modes: soft assignments of a batch, the meta-gradient against a
finite-difference reference, gradient surgery, and the joint loss."""

from __future__ import annotations

import pytest
import torch

from bloger_cli.recommender.model import Recommender, RecommenderConfig
from bloger_cli.recommender.vocab import SPECIAL
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.training.bilevel import joint_loss, meta_gradients, mixed_probs, rec_loss, surgery
from bloger_cli.training.data import Samples, make_batch
from bloger_cli.recommender.vocab import Vocab

L, K, N, D = 2, 4, 6, 8  # tokenizer levels, codes per level, items, embedding width


def setup(dtype=torch.float32):
    """A tiny RQ-VAE, a tiny recommender (L' = L + 1), 6 items and a batch of 4 samples."""
    torch.manual_seed(0)
    tokenizer = RQVAE(RQVAEConfig(input_dim=D, code_dim=4, levels=L, codebook_size=K, hidden=[8])).to(dtype)
    model = Recommender(RecommenderConfig(levels=L + 1, codebook_size=K, soft_levels=L, d_model=8, num_layers=1,
                                          num_heads=2, d_kv=4, d_ff=16, dropout=0.0)).to(dtype)
    x = torch.randn(N, D, dtype=dtype)
    codes = torch.cat([tokenizer.codes(x), torch.arange(N)[:, None] % K], dim=1)  # hard IDs (N, L + 1)
    samples = Samples(torch.arange(4), torch.tensor([[0, 1, -1], [2, 3, 4], [5, -1, -1], [1, 1, 3]]),
                      torch.tensor([2, 5, 0, 4]))
    return tokenizer, model, x, make_batch(samples, codes, Vocab(L + 1, K))


def test_mixed_probs_are_per_item_rows_of_the_soft_assignments_and_zero_at_padding():
    tokenizer, _, x, batch = setup()
    input_probs, decoder_probs, items = mixed_probs(tokenizer, x, batch)
    assert input_probs.shape == (4, 3, L, K) and decoder_probs.shape == (4, L, K)
    assert items.tolist() == [0, 1, 2, 3, 4, 5]
    full = tokenizer.soft_assignments(x)
    torch.testing.assert_close(input_probs[1], full[[2, 3, 4]])
    torch.testing.assert_close(decoder_probs, full[[2, 5, 0, 4]])
    assert torch.equal(input_probs[0, 2], torch.zeros(L, K)) and torch.equal(input_probs[2, 1:], torch.zeros(2, L, K))
    torch.testing.assert_close(input_probs[3, 0], input_probs[3, 1])  # the same item twice
    torch.testing.assert_close(input_probs[1].sum(-1), torch.ones(3, L))


def test_the_mixed_representation_is_the_hard_loss_with_a_gradient_into_the_tokenizer():
    tokenizer, model, x, batch = setup()
    params = dict(model.named_parameters())
    probs = mixed_probs(tokenizer, x, batch)
    loss = rec_loss(model, params, batch, probs[:2])
    assert torch.equal(loss, model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.labels).loss)
    grads = dict(zip([n for n, _ in tokenizer.named_parameters()],
                     torch.autograd.grad(loss, list(tokenizer.parameters()), allow_unused=True)))
    assert grads["quantizer.codebooks.0"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder"))


class Surrogate:
    """Recommender._soft with the straight-through's stop-gradient replaced by the soft assignments at
    phi_0: (p(phi) - p(phi_0)) @ E. Same value and derivatives at phi_0, and a function of phi that finite
    differences can see (the real one is constant in value)."""

    def __init__(self) -> None:
        self.base: list[torch.Tensor] = []
        self.calls = 0
        self.recording = True

    def __call__(self, model: Recommender, probs: torch.Tensor, first_level: int = 0) -> torch.Tensor:
        c = model.config
        rows = model.shared.weight[SPECIAL:SPECIAL + c.levels * c.codebook_size].view(c.levels, c.codebook_size, -1)
        rows = rows[first_level:first_level + probs.shape[-2]]
        if self.recording:
            self.base.append(probs.detach().clone())
        base = self.base[self.calls % len(self.base)]
        self.calls += 1
        return torch.einsum("...lk,lkd->...ld", probs - base, rows)


def lookahead_loss(model, tokenizer, x, batch, eta) -> torch.Tensor:
    """phi -> L_rec(theta - eta * grad_theta L_rec(theta, phi), phi), evaluated for the tokenizer as it is."""
    params = dict(model.named_parameters())
    probs = mixed_probs(tokenizer, x, batch)[:2]
    grads = torch.autograd.grad(rec_loss(model, params, batch, probs), list(params.values()))
    prime = {n: p - eta * g for (n, p), g in zip(params.items(), grads)}
    return rec_loss(model, prime, batch, probs).detach()


def test_meta_gradient_equals_finite_differences_in_float64(monkeypatch) -> None:
    tokenizer, model, x, batch = setup(torch.float64)
    eta = 0.5
    meta = meta_gradients(model, tokenizer, x, batch, eta=eta, lam=0.0, surgery_method="none")
    surrogate = Surrogate()
    monkeypatch.setattr(Recommender, "_soft", lambda self, probs, first_level=0: surrogate(self, probs, first_level))
    lookahead_loss(model, tokenizer, x, batch, eta)  # records p(phi_0) at every call
    surrogate.recording = False
    names = [n for n, _ in tokenizer.named_parameters()]
    flat = torch.cat([meta.grads[n].flatten() for n in names])
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        direction = torch.randn(flat.numel(), generator=g, dtype=torch.float64)
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                offset = 0
                for p in tokenizer.parameters():
                    p.add_(sign * eps * direction[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            assert torch.equal(tokenizer.codes(x), setup(torch.float64)[0].codes(x))  # hard codes unchanged
            values.append(lookahead_loss(model, tokenizer, x, batch, eta))
            with torch.no_grad():
                offset = 0
                for p in tokenizer.parameters():
                    p.sub_(sign * eps * direction[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
        numeric = float(values[0] - values[1]) / (2 * eps)
        analytic = float(flat @ direction)
        assert abs(analytic) > 1e-6
        assert abs(numeric - analytic) <= 1e-4 * abs(analytic)


def test_meta_gradient_adds_lam_times_the_tokenizer_loss_gradient_and_keeps_no_graph() -> None:
    tokenizer, model, x, batch = setup(torch.float64)
    plain = meta_gradients(model, tokenizer, x, batch, eta=0.1, lam=0.0, surgery_method="none")
    mixed = meta_gradients(model, tokenizer, x, batch, eta=0.1, lam=0.5, surgery_method="none")
    tok = tokenizer(x).losses.total  # every item of the catalog is in the batch
    own = torch.autograd.grad(tok, list(tokenizer.parameters()), allow_unused=True)
    for (name, _), g in zip(tokenizer.named_parameters(), own):
        expected = plain.grads[name] + 0.5 * (torch.zeros_like(plain.grads[name]) if g is None else g)
        torch.testing.assert_close(mixed.grads[name], expected)
        assert mixed.grads[name].grad_fn is None and not mixed.grads[name].requires_grad
    assert mixed.tok_loss == pytest.approx(float(tok)) and mixed.outer_loss < mixed.inner_loss + 1.0
    assert all(p.grad is None for p in list(model.parameters()) + list(tokenizer.parameters()))


def test_pcgrad_removes_the_conflicting_component_only() -> None:
    g = torch.Generator().manual_seed(0)
    g_tok = torch.randn(5, 3, generator=g)
    conflicting = -g_tok + 0.3 * torch.randn(5, 3, generator=g)
    projected, cos, fired = surgery(conflicting, g_tok, "pcgrad")
    assert fired and cos < 0
    assert abs(float((projected * g_tok).sum())) <= 1e-5 * float(conflicting.norm() * g_tok.norm())
    agreeing = g_tok + 0.3 * torch.randn(5, 3, generator=g)
    same, cos, fired = surgery(agreeing, g_tok, "pcgrad")
    assert not fired and cos > 0 and torch.equal(same, agreeing)
    kept, _, fired = surgery(conflicting, g_tok, "none")
    assert not fired and torch.equal(kept, conflicting)
    zero, _, fired = surgery(conflicting, torch.zeros(5, 3), "pcgrad")
    assert not fired and torch.equal(zero, conflicting)


def test_official_surgery_divides_by_each_row_norm() -> None:
    # g_rec = [[1, 0], [0, -2]], g_tok = [[1, 0], [0, 1]]: <g_rec, g_tok> = 1 - 2 = -1 < 0: conflict.
    # Rows of g_tok have squared norm 1 each, so official: g_rec - (-1 / 1) * g_tok = [[2, 0], [0, -1]];
    # pcgrad divides by the whole tensor's squared norm 2: g_rec + 0.5 * g_tok = [[1.5, 0], [0, -1.5]].
    g_rec = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    g_tok = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    official, cos, fired = surgery(g_rec, g_tok, "official")
    assert fired and cos == pytest.approx(-1 / (5 ** 0.5 * 2 ** 0.5))
    assert torch.equal(official, torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    assert torch.equal(surgery(g_rec, g_tok, "pcgrad")[0], torch.tensor([[1.5, 0.0], [0.0, -1.5]]))
    # a vector: both are the same projection
    v_rec, v_tok = torch.tensor([1.0, -3.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(surgery(v_rec, v_tok, "official")[0], surgery(v_rec, v_tok, "pcgrad")[0])


def test_official_surgery_on_a_codebook_replaces_the_recommendation_gradient() -> None:
    # DESIGN.md: a 256 x 32 codebook gradient at cosine -0.7 comes back near cosine +0.99, ~178x the norm
    g = torch.Generator().manual_seed(0)
    g_tok = torch.randn(256, 32, generator=g)
    other = torch.randn(256, 32, generator=g)
    other -= (other * g_tok).sum() / g_tok.pow(2).sum() * g_tok
    g_rec = -0.7 * g_tok / g_tok.norm() + (1 - 0.49) ** 0.5 * other / other.norm()
    out, cos, _ = surgery(g_rec, g_tok, "official")
    assert cos == pytest.approx(-0.7, abs=1e-5)
    after = float((out * g_tok).sum() / (out.norm() * g_tok.norm()))
    assert after > 0.95 and 150 < float(out.norm() / g_rec.norm()) < 200


def test_joint_loss_reaches_both_models() -> None:
    tokenizer, model, x, batch = setup()
    total, rec, tok = joint_loss(model, tokenizer, x, batch, lam=0.5)
    assert float(total) == pytest.approx(float(rec) + 0.5 * float(tok))
    total.backward()
    assert tokenizer.quantizer.codebooks[0].grad.abs().sum() > 0 and model.shared.weight.grad.abs().sum() > 0
