"""RQ-VAE training: k-means init, dead-code re-seeding, loss going down, early stopping, determinism."""

from __future__ import annotations

import torch

from bloger_cli.config import TokenizeConfig
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.tokenizer.trainer import init_codebooks, reseed_dead_codes, run_epoch, train_rqvae

D, d, L, K = 8, 4, 3, 4


def setup(seed: int = 0, n: int = 64) -> tuple[RQVAE, torch.Tensor]:
    torch.manual_seed(seed)
    model = RQVAE(RQVAEConfig(input_dim=D, code_dim=d, levels=L, codebook_size=K, hidden=[6]))
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(100))
    return model, x


def config(**overrides) -> TokenizeConfig:
    return TokenizeConfig(**{"levels": L, "codebook_size": K, "code_dim": d, "hidden": [6], "epochs": 4,
                             "batch_size": 16, "kmeans_iters": 10, "lr": 1e-2, "device": "cpu", **overrides})


def test_kmeans_initialisation_uses_every_code_of_every_level():
    model, x = setup()
    init_codebooks(model, x, 10, torch.Generator().manual_seed(0), torch.device("cpu"))
    codes = model.eval().codes(x)
    assert [len(codes[:, level].unique()) for level in range(L)] == [K] * L


def test_reseeding_makes_an_unused_code_used():
    model, x = setup()
    init_codebooks(model, x, 10, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        model.quantizer.codebooks[0][3] = 100.0  # far from every item: never chosen
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = run_epoch(model, x, optimizer, 16, torch.Generator().manual_seed(0))
    assert int(stats.usage[0, 3]) == 0
    assert stats.pool.shape[1:] == (L, d) and stats.pool.shape[0] >= K
    reseeded = reseed_dead_codes(model, stats.usage, stats.pool, torch.Generator().manual_seed(0), optimizer)
    assert reseeded[0] == 1
    assert float(optimizer.state[model.quantizer.codebooks[0]]["exp_avg"][3].abs().sum()) == 0.0
    assert 3 in model.eval().codes(x)[:, 0].tolist()


def test_training_lowers_the_loss_and_keeps_the_best_epoch():
    model, x = setup()
    result = train_rqvae(model, x, config(epochs=6, patience=None), torch.Generator().manual_seed(0))
    losses = [h["loss"] for h in result.history]
    assert result.epochs_run == 6 and len(losses) == 6
    assert losses[-1] < losses[0]
    assert result.best_loss == min(losses) and losses[result.best_epoch - 1] == result.best_loss


def test_patience_stops_when_the_loss_does_not_improve():
    model, x = setup()
    result = train_rqvae(model, x, config(epochs=50, lr=1e-12, weight_decay=0.0, patience=2, dead_codes="none"),
                         torch.Generator().manual_seed(0))
    assert result.epochs_run == 3 and result.best_epoch == 1


def test_training_is_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        model, x = setup()
        result = train_rqvae(model, x, config(), torch.Generator().manual_seed(7))
        runs.append((result.history, model.eval().codes(x), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])
