"""Samples from the sequences artifact and token batches built from the code table."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from bloger_cli.data.samples import Samples, _pad_lists, load_split, training_items
from bloger_cli.recommender.batch import make_batch
from bloger_cli.recommender.vocab import EOS, PAD, Vocab


def test_splits_follow_leave_one_out(tiny_workspace: Path) -> None:
    # TINY_LETTER after reindexing (items 2,3,4,5,10 -> 0..4 by numeric key): user 0 = [10,2,3,4] -> [4,0,1,2]
    train = load_split(tiny_workspace / "sequences.parquet", "train")
    test = load_split(tiny_workspace / "sequences.parquet", "test")
    user0 = test.user_ids == 0
    assert test.history[user0].tolist() == [[4, 0, 1] + [-1] * 17]
    assert test.target[user0].tolist() == [2]
    assert train.history[train.user_ids == 0].tolist() == [[4] + [-1] * 19]  # target 0; 1 is valid, 2 test
    assert train.target[train.user_ids == 0].tolist() == [0]


def test_history_is_capped_at_max_history(tiny_workspace: Path) -> None:
    test = load_split(tiny_workspace / "sequences.parquet", "test", history=2)
    assert test.history.shape[1] == 2
    assert test.history[test.user_ids == 0].tolist() == [[0, 1]]  # the two most recent


def test_pad_lists_handles_sliced_arrays() -> None:
    column = pa.array([[9], [1, 2, 3], [], [4, 5]], pa.list_(pa.int32())).slice(1)
    assert _pad_lists(column, 3).tolist() == [[1, 2, 3], [-1, -1, -1], [4, 5, -1]]


def test_training_items_exclude_validation_and_test_targets(tiny_workspace: Path) -> None:
    items = training_items(tiny_workspace / "sequences.parquet")
    # users [4,0,1,2], [0,1,2,4,3], [1,0,4] -> training parts [4,0], [0,1,2], [1]
    assert sorted(items.tolist()) == sorted([4, 0, 0, 1, 2, 1])


def test_make_batch_lays_out_tokens_item_major() -> None:
    vocab = Vocab(levels=2, codebook_size=3)
    codes = torch.tensor([[0, 1], [2, 0], [1, 2]])  # items 0..2
    samples = Samples(torch.tensor([7, 8]), torch.tensor([[0, 2], [1, -1]]), torch.tensor([1, 0]))
    batch = make_batch(samples, codes, vocab)
    # token = 2 + level * 3 + code
    assert batch.input_ids.tolist() == [[2, 6, 3, 7], [4, 5, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.decoder_input_ids.tolist() == [[PAD, 4, 5], [PAD, 2, 6]]
    assert batch.labels.tolist() == [[4, 5, EOS], [2, 6, EOS]]
