"""The RQ-VAE model: default widths, shapes, hand-checked loss terms, soft assignments, gradients."""

from __future__ import annotations

import pytest
import torch

from bloger_cli.tokenizer.rqvae import (
    RQVAE,
    ResidualQuantizer,
    RQVAEConfig,
    default_hidden,
    quantization_losses,
    squared_distances,
)

D, d, L, K, B = 8, 4, 3, 4, 5


def tiny_model(seed: int = 0, **overrides) -> RQVAE:
    torch.manual_seed(seed)
    cfg = RQVAEConfig(**{"input_dim": D, "code_dim": d, "levels": L, "codebook_size": K, "hidden": [6],
                         **overrides})
    return RQVAE(cfg)


def hand_quantizer() -> ResidualQuantizer:
    """L = 2, K = 2, d = 2 with codebooks {(0,0), (2,0)} and {(0,1), (0,-1)}."""
    q = ResidualQuantizer(levels=2, codebook_size=2, code_dim=2)
    with torch.no_grad():
        q.codebooks[0].copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
        q.codebooks[1].copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    return q


@pytest.mark.parametrize("dim, expected", [
    (384, [256, 128, 64]),
    (768, [512, 256, 128, 64]),
    (4096, [2048, 1024, 512, 256, 128, 64]),
    (64, []),
])
def test_default_hidden_halves_from_the_input(dim, expected):
    assert default_hidden(dim, 32) == expected
    assert RQVAEConfig.resolve(dim, 32, 4, 256, None, 0.0, 0.25).hidden == expected
    assert RQVAEConfig.resolve(dim, 32, 4, 256, [7], 0.0, 0.25).hidden == [7]


def test_squared_distances_match_cdist():
    torch.manual_seed(0)
    r, e = torch.randn(B, d), torch.randn(K, d)
    torch.testing.assert_close(squared_distances(r, e), torch.cdist(r, e) ** 2, rtol=1e-5, atol=1e-5)


def test_forward_shapes():
    out = tiny_model()(torch.randn(B, D))
    assert out.x_hat.shape == (B, D)
    assert out.z.shape == (B, d)
    assert out.codes.shape == (B, L) and out.codes.dtype == torch.int64
    assert out.probs.shape == (B, L, K)
    assert out.residuals.shape == (B, L, d)
    assert all(t.shape == () for t in out.losses)


def test_hand_checked_codes_residuals_and_loss_terms():
    # z = (1.8, 0.5): level 1 distances (3.49, 0.29) -> code 1, r_2 = (-0.2, 0.5);
    # level 2 distances (0.29, 2.29) -> code 0, r_3 = (-0.2, -0.5).
    q = hand_quantizer()(torch.tensor([[1.8, 0.5]]))
    assert q.codes.tolist() == [[1, 0]]
    torch.testing.assert_close(q.residuals[0], torch.tensor([[1.8, 0.5], [-0.2, 0.5]]))
    torch.testing.assert_close(q.probs[0, 0], torch.softmax(-torch.tensor([3.49, 0.29]), 0))
    codebook, commitment = quantization_losses(q)
    # each level: ||(-0.2, 0.5)||^2 = ||(-0.2, -0.5)||^2 = 0.29 (batch of one); summed over 2 levels
    torch.testing.assert_close(codebook, torch.tensor(0.58))
    torch.testing.assert_close(commitment, torch.tensor(0.58))


def test_total_loss_is_recon_plus_codebook_plus_weighted_commitment():
    model = tiny_model(commitment=0.25)
    x = torch.randn(B, D)
    out = model(x)
    torch.testing.assert_close(out.losses.recon, ((out.x_hat - x) ** 2).sum(dim=1).mean())
    expected = out.losses.recon + out.losses.codebook + 0.25 * out.losses.commitment
    torch.testing.assert_close(out.losses.total, expected)


def test_codebook_term_moves_codebooks_commitment_moves_the_encoder():
    q = hand_quantizer()
    z = torch.tensor([[1.8, 0.5]], requires_grad=True)
    codebook, _ = quantization_losses(q(z))
    codebook.backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0
    # d/d e of ||sg[r] - e||^2 at the chosen code e = (2, 0), r = (1.8, 0.5): -2 (r - e) = (0.4, -1.0)
    torch.testing.assert_close(q.codebooks[0].grad[1], torch.tensor([0.4, -1.0]))
    z.grad = None
    _, commitment = quantization_losses(q(z))
    commitment.backward()
    assert torch.count_nonzero(z.grad) > 0


def test_straight_through_reconstruction_gradient_reaches_the_encoder_not_the_codebooks():
    model = tiny_model()
    model(torch.randn(B, D)).losses.recon.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.encoder.parameters())
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.quantizer.parameters())


def test_soft_assignments_sum_to_one_and_argmax_is_the_hard_code():
    model = tiny_model().eval()
    x = torch.randn(13, D)
    p = model.soft_assignments(x)
    assert p.shape == (13, L, K)
    torch.testing.assert_close(p.sum(dim=2), torch.ones(13, L))
    assert torch.equal(p.argmax(dim=2), model.codes(x))
    assert torch.equal(model(x).codes, model.codes(x))


def test_soft_assignments_are_differentiable_in_encoder_and_every_earlier_codebook():
    model = tiny_model()
    p = model.soft_assignments(torch.randn(B, D))
    (p[:, L - 1] * torch.arange(K)).sum().backward()  # depends on the last level only
    assert torch.count_nonzero(model.encoder[0].weight.grad) > 0
    assert all(torch.count_nonzero(book.grad) > 0 for book in model.quantizer.codebooks)


def test_codebook_gradients_are_bitwise_reproducible_at_full_size():
    # codebook[code]'s backward accumulated in a varying order on 2 CPU threads at this size
    torch.manual_seed(0)
    q = ResidualQuantizer(levels=2, codebook_size=256, code_dim=32)
    z = torch.randn(1024, 32)
    grads = []
    for _ in range(5):
        q.zero_grad()
        sum(quantization_losses(q(z))).backward()
        grads.append([book.grad.clone() for book in q.codebooks])
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))
