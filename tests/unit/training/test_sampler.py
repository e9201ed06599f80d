"""Length-grouped batches: every sample once, deterministic per (seed, epoch), little padding, and a
sample's loss and logits the same in a trimmed batch as in one padded to the cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bloger_cli.data.samples import Samples, load_split
from bloger_cli.recommender.batch import make_batch
from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import Vocab
from bloger_cli.training.sampler import epoch_batches, padding_waste


def skewed_lengths(n: int = 5000, cap: int = 20, seed: int = 0) -> torch.Tensor:
    """History lengths shaped like Beauty's: many short, a tail at the cap."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.minimum(rng.geometric(0.15, size=n), cap))


@pytest.mark.parametrize("group", [None, 50, 3])
def test_every_sample_once_in_ceil_n_over_b_batches(group) -> None:
    lengths = skewed_lengths(1003)
    batches = epoch_batches(7, 2, lengths, 64, group)
    assert len(batches) == -(-1003 // 64)
    assert sorted(torch.cat(batches).tolist()) == list(range(1003))
    assert sum(len(b) < 64 for b in batches) == 1  # only one short batch


def test_batches_are_a_function_of_seed_and_epoch() -> None:
    lengths = skewed_lengths(500)
    same = zip(epoch_batches(1, 3, lengths, 32, 50), epoch_batches(1, 3, lengths, 32, 50))
    assert all(torch.equal(a, b) for a, b in same)
    assert not torch.equal(torch.cat(epoch_batches(1, 3, lengths, 32, 50)),
                           torch.cat(epoch_batches(1, 4, lengths, 32, 50)))


def test_grouping_removes_most_padding() -> None:
    lengths = skewed_lengths()
    plain = padding_waste(epoch_batches(0, 1, lengths, 256, None), lengths)
    grouped = padding_waste(epoch_batches(0, 1, lengths, 256, 50), lengths)
    assert plain > 0.5 and grouped < 0.10


@pytest.mark.shared_data
def test_beauty_padding_waste_is_under_ten_percent(shared_datasets, tmp_path) -> None:
    from conftest import require_dataset

    from bloger_cli.config import PrepareConfig
    from bloger_cli.stages import prepare
    from bloger_cli.workspace import Workspace

    folder = require_dataset("beauty")
    ws = Workspace(tmp_path / "ws")
    prepare.run(PrepareConfig(source="letter", input=folder / "Beauty.inter.json"), ws)
    lengths = load_split(ws.path("sequences"), "train").lengths()
    waste = padding_waste(epoch_batches(42, 1, lengths, 256, 50), lengths)
    plain = padding_waste(epoch_batches(42, 1, lengths, 256, None), lengths)
    assert waste <= 0.10, (waste, plain)
    assert plain > 0.5  # what the fixed 20-item padding costed


def test_trimmed_batch_gives_the_same_loss_and_logits() -> None:
    # eval mode: the same sample in a batch trimmed to its longest history and in one padded to 20 slots
    torch.manual_seed(0)
    vocab = Vocab(3, 8)
    model = Recommender(RecommenderConfig(levels=3, codebook_size=8, soft_levels=2, d_model=16, num_layers=2,
                                          num_heads=2, d_kv=8, d_ff=32, rel_buckets=8, rel_max_distance=20)).eval()
    codes = torch.randint(0, 8, (30, 3))
    history = torch.full((4, 20), -1)
    for row, n in enumerate([3, 1, 5, 2]):
        history[row, :n] = torch.randint(0, 30, (n,))
    samples = Samples(torch.arange(4), history, torch.tensor([4, 9, 2, 0]))
    padded, trimmed = make_batch(samples, codes, vocab), make_batch(samples.trim(5), codes, vocab)
    assert trimmed.input_ids.shape == (4, 15) and padded.input_ids.shape == (4, 60)
    with torch.no_grad():
        a = model(padded.input_ids, padded.attention_mask, padded.decoder_input_ids, padded.labels)
        b = model(trimmed.input_ids, trimmed.attention_mask, trimmed.decoder_input_ids, trimmed.labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
