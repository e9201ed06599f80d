"""Decoding: the prefix index against a Python trie, exact scores against a full decode per item, beam
search against the exact ranking, and the guarantees (valid, distinct items; -1 / -inf padding)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloger_cli.errors import DataError
from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.decoding import PrefixIndex, Ranking, beam_search, exact_scores, exact_topk, recommend
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import PAD

LEVELS, K = 3, 4  # L' tokens per item, K codes per level


def catalog(seed: int, n: int, levels: int = LEVELS, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct random code sequences (N, L') and item ids that are not 0..N-1 (to catch index mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(k ** levels, generator=g)[:n]  # (N,) distinct sequences as base-K numbers
    codes = torch.stack([flat // k ** (levels - 1 - level) % k for level in range(levels)], dim=1)  # (N, L')
    item_ids = torch.randperm(1000, generator=g)[:n] + 100  # (N,)
    return codes, item_ids


@cache
def tiny_model(seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    config = RecommenderConfig(levels=LEVELS, codebook_size=K, soft_levels=2, d_model=16, num_layers=2,
                               num_heads=2, d_kv=8, d_ff=32, dropout=0.0)
    return Recommender(config).eval()


def histories(model: Recommender, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random histories of 2 items (B, S = 2 L'); the last user's first item is padding."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (batch, 2, LEVELS), generator=g)  # (B, 2, L')
    input_ids = model.config.vocab.tokens(codes).flatten(1)  # (B, S)
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)  # (B, S)
    attention_mask[-1, :LEVELS] = False
    input_ids[-1, :LEVELS] = PAD
    return input_ids, attention_mask


def memory_for(model: Recommender, batch: int = 3, seed: int = 0):
    with torch.no_grad():
        return model.encode(*histories(model, batch, seed))


# --- the prefix index -------------------------------------------------------------------------------


def python_trie(codes: torch.Tensor) -> dict[tuple[int, ...], set[int]]:
    """Every valid prefix (the full sequences included) -> the codes that may follow it."""
    children: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for row in codes.tolist():
        for level in range(len(row) + 1):
            children[tuple(row[:level])]
            if level < len(row):
                children[tuple(row[:level])].add(row[level])
    return children


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), levels=st.integers(1, 3), k=st.integers(2, 5), data=st.data())
def test_prefix_index_matches_a_python_trie(seed, levels, k, data):
    n = data.draw(st.integers(1, k ** levels))
    codes, item_ids = catalog(seed, n, levels, k)
    index = PrefixIndex.build(codes, item_ids, codebook_size=k)
    trie = python_trie(codes)
    item_of = {tuple(row): item for row, item in zip(codes.tolist(), item_ids.tolist())}
    for level in range(levels + 1):
        prefixes = list(itertools.product(range(k), repeat=level))  # every prefix, valid or not
        groups = torch.zeros(len(prefixes), dtype=torch.long)
        for step in range(level):  # walk down the index; -1 sticks once a step is invalid
            codes_at = torch.tensor([p[step] for p in prefixes])
            child = index.advance(step, groups.clamp(min=0), codes_at)
            groups = torch.where(groups >= 0, child, -1)
        valid = [p in trie for p in prefixes]
        assert (groups >= 0).tolist() == valid
        found = groups[groups >= 0]
        assert len(torch.unique(found)) == len(found)  # distinct prefixes, distinct groups
        if level == levels:
            expected = [item_of[p] for p, ok in zip(prefixes, valid) if ok]
            assert index.items(found).tolist() == expected
        else:
            mask = index.allowed(level, found)
            expected = [[c in trie[p] for c in range(k)] for p, ok in zip(prefixes, valid) if ok]
            assert mask.tolist() == expected
    assert index.num_items == n


def test_shared_codes_are_refused_naming_an_example():
    codes = torch.tensor([[0, 1, 2], [3, 0, 1], [0, 1, 2]])
    with pytest.raises(DataError) as err:
        PrefixIndex.build(codes, torch.tensor([10, 11, 12]))
    assert str(err.value) == (
        "2 items share their semantic ID with another item (e.g. items 10 and 12 both have (0, 1, 2)); "
        "decoding needs IDs that map one-to-one to items; run `bloger tokenize` with disambiguation on "
        "(`--set disambiguate=true`, the default)")


def test_repeated_item_ids_and_out_of_range_codes_are_refused():
    with pytest.raises(DataError, match=r"item ids are not unique \(1 repeated\)"):
        PrefixIndex.build(torch.tensor([[0, 1], [1, 0]]), torch.tensor([7, 7]))
    with pytest.raises(DataError, match=r"codes range over 0\.\.4, outside the codebook 0\.\.3"):
        PrefixIndex.build(torch.tensor([[0, 4], [1, 0]]), torch.tensor([1, 2]), codebook_size=4)


# --- exact scores and beam search ---------------------------------------------------------------------


def test_exact_scores_match_a_full_decode_per_item():
    model = tiny_model(0)
    memory = memory_for(model, batch=3)
    codes, item_ids = catalog(1, 7)
    vocab = model.config.vocab
    expected = torch.empty(3, 7)
    with torch.no_grad():
        for i, row in enumerate(vocab.tokens(codes)):
            tokens = torch.cat([torch.tensor([PAD]), row]).expand(3, 1, -1)  # (B, W=1, L'+1) with the EOS slot
            hidden, _ = model.decode(memory, tokens)  # (B, 1, L'+1, D), no cache
            logp = torch.log_softmax(model.logits(hidden), dim=-1)[:, 0]  # (B, L'+1, V)
            expected[:, i] = sum(logp[:, level, row[level]] for level in range(LEVELS))  # EOS not scored
    index = PrefixIndex.build(codes, item_ids)
    torch.testing.assert_close(exact_scores(model, memory, index, chunk=3), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact_scores(model, memory, codes), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_beam_as_wide_as_the_catalog_finds_the_exact_ranking(seed):
    model = tiny_model(seed)
    memory = memory_for(model, batch=3, seed=seed)
    index = PrefixIndex.build(*catalog(seed, 15))
    beam = beam_search(model, memory, index, beam=15, k=10)
    exact = exact_topk(model, memory, index, k=10)
    assert torch.equal(beam.items, exact.items)
    torch.testing.assert_close(beam.scores, exact.scores, rtol=1e-5, atol=1e-5)
    assert beam.items.dtype == torch.int64 and beam.scores.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 3), n=st.integers(1, 20), beam=st.integers(1, 19), data=st.data())
def test_beam_search_returns_distinct_catalog_items_with_their_exact_scores(seed, n, beam, data):
    k = data.draw(st.integers(1, beam))
    model = tiny_model(seed)
    memory = memory_for(model, batch=2, seed=seed)
    codes, item_ids = catalog(seed + n, n)
    index = PrefixIndex.build(codes, item_ids)
    out = beam_search(model, memory, index, beam=beam, k=k)
    assert out.items.shape == out.scores.shape == (2, k)
    exact = exact_scores(model, memory, index)  # (B, N)
    row_of = {item: row for row, item in enumerate(item_ids.tolist())}
    for user in range(2):
        items, scores = out.items[user].tolist(), out.scores[user]
        found = [item for item in items if item != -1]
        assert items == found + [-1] * (k - len(found))  # padding only at the end
        assert len(found) == min(k, n)  # a beam keeps every sequence while fewer than beam exist
        assert len(set(found)) == len(found) and set(found) <= set(row_of)
        assert torch.all(scores[:len(found)].diff() <= 0) and torch.all(scores[len(found):] == float("-inf"))
        rows = torch.tensor([row_of[item] for item in found], dtype=torch.long)
        torch.testing.assert_close(scores[:len(found)], exact[user, rows], rtol=1e-5, atol=1e-5)


def test_fewer_items_than_k_pads_with_minus_one_and_minus_inf():
    model = tiny_model(0)
    memory = memory_for(model, batch=2)
    codes, item_ids = catalog(3, 3)
    index = PrefixIndex.build(codes, item_ids)
    for out in (beam_search(model, memory, index, beam=6, k=5), exact_topk(model, memory, index, k=5)):
        assert sorted(out.items[:, :3].flatten().tolist()) == sorted(item_ids.tolist() * 2)
        assert out.items[:, 3:].tolist() == [[-1, -1]] * 2
        assert torch.isfinite(out.scores[:, :3]).all() and (out.scores[:, 3:] == float("-inf")).all()
        assert not out.scores.isnan().any()


def test_a_catalog_of_one_item_for_one_user():
    model = tiny_model(0)
    memory = memory_for(model, batch=1)
    index = PrefixIndex.build(torch.tensor([[2, 0, 3]]), torch.tensor([42]))
    out = beam_search(model, memory, index, beam=1, k=1)
    assert out.items.tolist() == [[42]]
    torch.testing.assert_close(out.scores, exact_scores(model, memory, index), rtol=1e-5, atol=1e-5)


def test_recommend_encodes_then_decodes_and_keeps_the_models_mode():
    model = tiny_model(1)
    index = PrefixIndex.build(*catalog(4, 12))
    input_ids, attention_mask = histories(model, 2, seed=5)
    beam = recommend(model, input_ids, attention_mask, index, k=5, beam=12)
    exact = recommend(model, input_ids, attention_mask, index, k=5, method="exact")
    assert isinstance(beam, Ranking) and torch.equal(beam.items, exact.items)
    assert not model.training


def test_bad_arguments_are_refused():
    model = tiny_model(0)
    memory = memory_for(model, batch=1)
    index = PrefixIndex.build(*catalog(0, 5))
    with pytest.raises(ValueError, match="need 1 <= k <= beam, got k=6 and beam=5"):
        beam_search(model, memory, index, beam=5, k=6)
    with pytest.raises(ValueError, match="the index has 2 levels of 4 codes, the model 3 levels of 4"):
        beam_search(model, memory, PrefixIndex.build(*catalog(0, 5, levels=2)), beam=5, k=5)
    with pytest.raises(ValueError, match="method must be 'beam' or 'exact', got 'greedy'"):
        recommend(model, *histories(model, 1, 0), index, k=1, method="greedy")  # type: ignore[arg-type]
