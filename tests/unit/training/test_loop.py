"""The loop's pieces: schedules, epoch order, and two golden training steps."""

from __future__ import annotations

import math

import pytest
import torch

from bloger_cli.config import TrainConfig
from bloger_cli.training.loop import epoch_order, lr_factor


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0]),
    ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25, 0.0]),
])
def test_warmup_then_schedule(schedule: str, expected: list[float]) -> None:
    # warmup over steps 0 and 1, then the decay runs over the remaining 3 of 5 steps
    cfg = TrainConfig(schedule=schedule, warmup_steps=2)
    assert [lr_factor(s, cfg, 5) for s in range(6)] == pytest.approx(expected, abs=1e-12)


def test_cosine_reaches_zero_at_the_last_step() -> None:
    cfg = TrainConfig(schedule="cosine", warmup_steps=0)
    assert lr_factor(0, cfg, 10) == 1.0
    assert lr_factor(5, cfg, 10) == pytest.approx(0.5)
    assert lr_factor(10, cfg, 10) == pytest.approx(0.0)
    assert math.isclose(lr_factor(20, cfg, 10), 0.0, abs_tol=1e-12)  # clamped past the end


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert torch.equal(epoch_order(3, 2, 50), epoch_order(3, 2, 50))
    assert not torch.equal(epoch_order(3, 2, 50), epoch_order(3, 1, 50))
    assert sorted(epoch_order(3, 2, 50).tolist()) == list(range(50))
