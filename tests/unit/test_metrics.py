"""Ranking metrics: hand-computed cases, popularity ties and padding, bad inputs, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloger_cli.metrics import MISS, MetricAccumulator, ndcg_at, popularity_ranking, ranks, recall_at, summarize


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# --- ranks ---------------------------------------------------------------------------------------


def test_ranks_hit_miss_and_first_slot() -> None:
    predicted = t([[7, 3, 9, 1, 4], [5, 6, 8, -1, -1], [2, 0, 1, 3, 4]])  # (B=3, M=5)
    assert ranks(predicted, t([9, 4, 2])).tolist() == [2, MISS, 0]


def test_ranks_empty_slots_never_match() -> None:
    predicted = t([[-1, -1], [3, -1]])
    assert ranks(predicted, t([-1, -1])).tolist() == [MISS, MISS]


def test_ranks_duplicate_uses_first_occurrence() -> None:
    assert ranks(t([[4, 2, 2]]), t([2])).tolist() == [1]


def test_ranks_empty_lists() -> None:
    assert ranks(torch.empty(2, 0, dtype=torch.long), t([1, 2])).tolist() == [MISS, MISS]


def test_ranks_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="predicted has 2 rows but target has 3 entries"):
        ranks(t([[1, 2], [3, 4]]), t([1, 2, 3]))


def test_ranks_rejects_float_ids() -> None:
    with pytest.raises(ValueError, match="predicted must hold integer item ids, got dtype torch.float"):
        ranks(torch.zeros(2, 3), t([1, 2]))


# --- recall / ndcg / summarize -------------------------------------------------------------------


def test_hit_at_third_place() -> None:
    rank = t([2])  # third place, 0-based 2
    assert ndcg_at(rank, 5).item() == 0.5  # 1 / log2(4), exact
    assert recall_at(rank, 5).item() == 1.0


def test_miss_scores_zero() -> None:
    rank = t([MISS])
    assert ndcg_at(rank, 5).item() == 0.0
    assert recall_at(rank, 5).item() == 0.0


def test_rank_equal_to_k_is_a_miss() -> None:
    rank = t([5])
    assert recall_at(rank, 5).item() == 0.0
    assert ndcg_at(rank, 5).item() == 0.0
    assert recall_at(rank, 6).item() == 1.0
    assert ndcg_at(rank, 6).item() == pytest.approx(1 / math.log2(7))


def test_summarize_means_over_users() -> None:
    rank = t([0, 2, MISS, 7])  # hit at 1st, hit at 3rd, miss, hit at 8th
    out = summarize(rank, [1, 5, 10])
    assert list(out) == ["recall@1", "ndcg@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10"]
    assert out["recall@1"] == 0.25 and out["ndcg@1"] == 0.25
    assert out["recall@5"] == 0.5 and out["ndcg@5"] == (1 + 0.5) / 4
    assert out["recall@10"] == 0.75
    assert out["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(9)) / 4)
    assert all(type(v) is float for v in out.values())


def test_summarize_empty_batch() -> None:
    with pytest.raises(ValueError, match="cannot summarize metrics over 0 users"):
        summarize(t([]), [5])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_ks(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"ks entry 1 must be a positive integer, got {bad!r}"):
        summarize(t([0]), [5, bad])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=rf"k must be a positive integer, got {bad!r}"):
        recall_at(t([0]), bad)  # type: ignore[arg-type]


def test_empty_ks() -> None:
    with pytest.raises(ValueError, match="ks is empty"):
        summarize(t([0]), [])


# --- popularity ----------------------------------------------------------------------------------


def test_popularity_ties_go_to_smaller_id() -> None:
    train = t([3, 1, 3, 1, 4, 0, 2, 2])  # counts: 0:1 1:2 2:2 3:2 4:1
    assert popularity_ranking(train, num_items=6, k=4).tolist() == [1, 2, 3, 0]


def test_popularity_pads_with_minus_one() -> None:
    assert popularity_ranking(t([2, 2, 0]), num_items=3, k=5).tolist() == [2, 0, 1, -1, -1]


def test_popularity_rejects_unknown_item() -> None:
    with pytest.raises(ValueError, match=r"item id 7, outside \[0, num_items=5\)"):
        popularity_ranking(t([1, 7]), num_items=5, k=2)


# --- accumulator ---------------------------------------------------------------------------------


def test_accumulator_matches_one_batch() -> None:
    acc = MetricAccumulator()
    assert acc.n_users == 0
    acc.update(t([[1, 2, 3], [4, 5, 6]]), t([3, 9]))  # ranks 2, miss
    acc.add(t([0]))
    assert acc.n_users == 3
    assert acc.rank.tolist() == [2, MISS, 0]
    assert acc.summarize([5]) == summarize(t([2, MISS, 0]), [5])


def test_accumulator_empty_raises() -> None:
    with pytest.raises(ValueError, match="0 users"):
        MetricAccumulator().summarize([5])


# --- properties ----------------------------------------------------------------------------------

rank_lists = st.lists(st.integers(min_value=-1, max_value=60), min_size=1, max_size=30)
cutoffs = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=6)


@settings(max_examples=50, deadline=None)
@given(rank_lists, cutoffs)
def test_metric_properties(values: list[int], ks: list[int]) -> None:
    rank = t(values)
    ks = sorted(ks)
    for k in ks:
        ndcg, recall = ndcg_at(rank, k), recall_at(rank, k)
        assert ((ndcg >= 0) & (ndcg <= 1)).all()
        assert (ndcg <= recall).all()
    out = summarize(rank, ks)
    recalls = [out[f"recall@{k}"] for k in ks]
    ndcgs = [out[f"ndcg@{k}"] for k in ks]
    assert recalls == sorted(recalls)  # monotone non-decreasing in k
    assert ndcgs == sorted(ndcgs)


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(12))), st.integers(min_value=0, max_value=15), st.integers(0, 12))
def test_ranks_match_list_index(items: list[int], target: int, length: int) -> None:
    row = items[:length] + [-1] * (12 - length)
    expected = row.index(target) if target in row else MISS
    assert ranks(t([row]), t([target])).tolist() == [expected]
