"""SASRec: shapes, causal attention over left-aligned histories, padding invariance, golden losses."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bloger_cli.baseline.config import SASRecConfig
from bloger_cli.baseline.sasrec import SASRec

TINY = SASRecConfig(layers=2, heads=2, hidden=8, inner=16, dropout=0.0)


def tiny_model(num_items: int = 7, max_len: int = 5) -> SASRec:
    torch.manual_seed(0)
    return SASRec(TINY, num_items, max_len).eval()


def test_scores_every_item_from_the_newest_position() -> None:
    model = tiny_model()
    history = torch.tensor([[1, 2, 3, -1, -1], [4, -1, -1, -1, -1]])  # (B=2, T=5), left-aligned
    out = model(history)
    assert out.state.shape == (2, 8) and out.logits.shape == (2, 7)
    assert torch.allclose(out.logits, out.state @ model.item.weight[:7].T)


def test_padding_and_later_items_do_not_change_the_state() -> None:
    model = tiny_model()
    short = model(torch.tensor([[1, 2, -1, -1, -1]])).state
    assert torch.allclose(short, model(torch.tensor([[1, 2]])).state, atol=1e-6)  # trailing padding
    # causal: the state at item 2 of [1, 2, 3] is what [1, 2] gives; is_causal hides item 3 from it
    hidden = {}
    model.blocks[-1].register_forward_hook(lambda m, i, o: hidden.setdefault("x", o))
    model(torch.tensor([[1, 2, 3, -1, -1]]))
    assert torch.allclose(hidden["x"][0, 1], short[0], atol=1e-6)


def test_history_longer_than_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^history has 6 positions, the model was built for 5$"):
        tiny_model()(torch.zeros(1, 6, dtype=torch.long))


def test_two_training_steps_golden_losses() -> None:
    model = tiny_model().train()
    history = torch.tensor([[1, 2, 3, -1, -1], [4, 5, -1, -1, -1], [6, 0, 1, 2, 3]])
    target = torch.tensor([4, 6, 5])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(2):
        loss = F.cross_entropy(model(history).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses == pytest.approx(GOLDEN, rel=1e-4)


GOLDEN = [1.9645519256591797, 1.8533376455307007]  # torch 2.13.0 CPU, seed 0
