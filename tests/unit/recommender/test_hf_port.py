"""The port to Hugging Face T5: same logits, an untied lm_head, and a save/load round trip."""

from __future__ import annotations

import pytest
import torch

from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.hf_port import hf_name, to_hf_t5
from bloger_cli.recommender.model import Recommender, relative_position_bucket
from bloger_cli.recommender.vocab import EOS, PAD

transformers = pytest.importorskip("transformers")


def ported_pair(seed: int = 0) -> tuple[Recommender, transformers.T5ForConditionalGeneration]:
    """A tiny model (3 decoder layers against 2 encoder layers) with every weight perturbed (norms too)."""
    torch.manual_seed(seed)
    config = RecommenderConfig(levels=3, codebook_size=4, soft_levels=2, d_model=16, num_layers=2,
                               num_decoder_layers=3, num_heads=2, d_kv=8, d_ff=32)
    model = Recommender(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, to_hf_t5(model)


def inputs(items: int = 2) -> dict[str, torch.Tensor]:
    """Histories of `items` items (S = 3 items); 20 items reach T5's log-spaced distance buckets (>= 8)."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 14, (2, 3 * items), generator=g)  # (B, S)
    attention_mask = torch.ones(2, 3 * items, dtype=torch.long)
    attention_mask[1, :3] = 0  # user 1's first item is padding
    input_ids[1, :3] = PAD
    decoder_input_ids = torch.cat([torch.full((2, 1), PAD), torch.randint(2, 14, (2, 3), generator=g)], dim=1)
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)


@pytest.mark.parametrize("attention, items", [("eager", 2), ("sdpa", 2), ("sdpa", 20)])
def test_ported_model_gives_our_logits(attention, items):
    model, hf = ported_pair()
    hf.set_attn_implementation(attention)
    assert not hf.training
    with torch.no_grad():
        ours = model(**inputs(items)).logits
        theirs = hf(**inputs(items)).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 301)[None, :]  # (1, 601) key - query
    ours = relative_position_bucket(distance, bidirectional, num_buckets=32, max_distance=128)
    theirs = T5Attention._relative_position_bucket(distance, bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(ours, theirs) and ours.max() == 31  # the last log-spaced bucket is reached


def test_ported_config_and_weights():
    model, hf = ported_pair()
    c = hf.config
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_decoder_layers, c.num_heads) == (
        14, 16, 8, 32, 2, 3, 2)
    assert (c.decoder_start_token_id, c.pad_token_id, c.eos_token_id, c.feed_forward_proj) == (PAD, PAD, EOS, "relu")
    assert hf.lm_head.weight is not hf.shared.weight and not c.scale_decoder_outputs  # untied, unscaled
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(hf_params[hf_name(name)], p), name


def test_save_and_load_round_trip_keeps_the_logits(tmp_path):
    model, hf = ported_pair()
    hf.save_pretrained(tmp_path)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, model(**inputs()).logits, rtol=0, atol=1e-5)
