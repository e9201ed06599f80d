"""Semantic IDs: hand-made statistics, collision report, one-to-one disambiguation, chunked assignment."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloger_cli.errors import DataError
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.tokenizer.semantic_ids import assign_all, collision_report, disambiguate, level_stats, prefix_groups


def t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_level_statistics_on_a_hand_made_case():
    # level 1 codes 0,0,1,2: 3 of 4 used, p = (1/2, 1/4, 1/4) -> 1.5 bits; items 0 and 1 share prefix (0)
    # level 2 codes 1,2,3,3: 3 used, 1.5 bits; every full prefix unique
    codes = t([[0, 1], [0, 2], [1, 3], [2, 3]])
    rows = level_stats(codes, prefix_groups(codes), 4, [0.5, 0.25])
    assert rows == [
        {"level": 1, "codes_used": 3, "density": 0.75, "entropy_bits": 1.5, "collision_rate": 0.5,
         "quantization_error": 0.5},
        {"level": 2, "codes_used": 3, "density": 0.75, "entropy_bits": 1.5, "collision_rate": 0.0,
         "quantization_error": 0.25},
    ]


def test_uniform_codes_have_maximal_entropy():
    codes = t([[0], [1], [2], [3]])
    (row,) = level_stats(codes, prefix_groups(codes), 4, [0.0])
    assert row["entropy_bits"] == pytest.approx(math.log2(4))
    assert row["density"] == 1.0 and row["collision_rate"] == 0.0


def test_collision_report_and_disambiguation_by_item_id():
    codes = t([[0, 0], [0, 0], [1, 1], [0, 0]])
    item_ids = torch.tensor([30, 10, 20, 40])
    groups = prefix_groups(codes)[-1]
    assert collision_report(groups) == (0.75, 3, 3)
    ids = disambiguate(codes, item_ids, groups, capacity=4)
    # group (0, 0) holds items 30, 10, 40 -> ranks by id: 10 -> 0, 30 -> 1, 40 -> 2; item 20 alone -> 0
    assert ids.tolist() == [[0, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 2]]


def test_no_collisions_gives_suffix_zero_everywhere():
    codes = t([[0, 1], [1, 0], [1, 1]])
    groups = prefix_groups(codes)[-1]
    assert collision_report(groups) == (0.0, 0, 1)
    assert disambiguate(codes, torch.arange(3), groups, 2)[:, -1].tolist() == [0, 0, 0]


def test_a_group_larger_than_the_suffix_level_is_refused():
    codes = t([[1, 2]] * 5 + [[0, 0]])
    with pytest.raises(DataError) as err:
        disambiguate(codes, torch.arange(6), prefix_groups(codes)[-1], capacity=4)
    assert str(err.value) == ("5 items share the semantic ID (1, 2), more than the 4 disambiguation codes; "
                              "raise --codebook-size or --levels so fewer items collide (an undertrained rqvae also "
                              "collides: try more --epochs)")


@st.composite
def code_matrices(draw):
    n = draw(st.integers(1, 60))
    levels = draw(st.integers(1, 3))
    k = draw(st.integers(2, 6))
    flat = draw(st.lists(st.integers(0, k - 1), min_size=n * levels, max_size=n * levels))
    perm = draw(st.permutations(range(n)))
    return t([flat[i * levels:(i + 1) * levels] for i in range(n)]), torch.tensor(perm) * 7, k


@settings(max_examples=150, deadline=None)
@given(code_matrices())
def test_disambiguated_ids_are_one_to_one(case):
    codes, item_ids, k = case
    groups = prefix_groups(codes)
    inverse, counts = groups[-1]
    if int(counts.max()) > k:
        with pytest.raises(DataError):
            disambiguate(codes, item_ids, groups[-1], k)
        return
    ids = disambiguate(codes, item_ids, groups[-1], k)
    assert len(torch.unique(ids, dim=0)) == len(ids)  # one-to-one
    assert torch.equal(ids[:, :-1], codes)
    suffix, size = ids[:, -1], counts[inverse]
    assert bool((suffix[size == 1] == 0).all())  # singletons get 0
    assert bool((suffix < size).all())
    # within a group the suffix follows item id order
    for g in range(len(counts)):
        members = (inverse == g).nonzero().squeeze(1)
        assert suffix[members[torch.argsort(item_ids[members])]].tolist() == list(range(len(members)))


@given(code_matrices())
@settings(max_examples=50, deadline=None)
def test_prefix_groups_match_python_grouping(case):
    codes, _, _ = case
    for level, (inverse, counts) in enumerate(prefix_groups(codes)):
        prefixes = [tuple(row[:level + 1]) for row in codes.tolist()]
        shared = [prefixes.count(p) for p in prefixes]
        assert counts[inverse].tolist() == shared
        assert len(counts) == len(set(prefixes))


def test_assignment_in_chunks_equals_one_chunk_and_reports_errors():
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(input_dim=8, code_dim=4, levels=3, codebook_size=4, hidden=[6]))
    x = torch.randn(23, 8)
    whole = assign_all(model, x, torch.device("cpu"), chunk=64)
    parts = assign_all(model, x, torch.device("cpu"), chunk=5)
    assert torch.equal(whole.codes, parts.codes)
    assert torch.equal(whole.codes, model.codes(x))
    assert whole.quantization_error == pytest.approx(parts.quantization_error)
    with torch.no_grad():
        q = model.quantizer(model.encode(x))
        expected = (q.residuals - q.chosen).pow(2).sum(2).mean(0).tolist()
        recon = float((model.decode(q.quantized) - x).pow(2).mean())
    assert whole.quantization_error == pytest.approx(expected, rel=1e-5)
    assert whole.reconstruction_error == pytest.approx(recon, rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 40), st.integers(1, 3), st.integers(2, 4))
def test_keep_suffixes_keeps_unchanged_items_and_stays_one_to_one(seed: int, n: int, levels: int, k: int) -> None:
    from bloger_cli.tokenizer.semantic_ids import keep_suffixes

    g = torch.Generator().manual_seed(seed)
    before = torch.randint(0, k, (n, levels), generator=g)
    after = before.clone()
    moved = torch.rand(n, generator=g) < 0.4
    after[moved] = torch.randint(0, k, (int(moved.sum()), levels), generator=g)
    item_ids = torch.randperm(n, generator=g)
    capacity = n  # every group fits
    previous = disambiguate(before, item_ids, prefix_groups(before)[-1], capacity)
    ids = keep_suffixes(after, previous, item_ids, prefix_groups(after)[-1], capacity)
    assert torch.equal(ids[:, :-1], after)
    assert len(torch.unique(ids, dim=0)) == n  # one-to-one
    same = (after == before).all(dim=1)
    assert torch.equal(ids[same, -1], previous[same, -1])  # an unchanged prefix keeps its suffix
    assert int(ids[:, -1].max()) < capacity


def test_keep_suffixes_hand_case() -> None:
    from bloger_cli.tokenizer.semantic_ids import keep_suffixes

    # items 0, 1, 2 shared (1, 1) with suffixes 0, 1, 2; item 1 moves away, item 3 moves in
    previous = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 2], [0, 0, 0]])
    codes = torch.tensor([[1, 1], [0, 2], [1, 1], [1, 1]])
    ids = keep_suffixes(codes, previous, torch.arange(4), prefix_groups(codes)[-1], capacity=4)
    # a fresh ranking would give item 2 the suffix 1; here it keeps 2 and item 3 takes the free 1
    assert ids.tolist() == [[1, 1, 0], [0, 2, 0], [1, 1, 2], [1, 1, 1]]
