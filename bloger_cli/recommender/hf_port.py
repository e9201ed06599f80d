"""Copy a `Recommender` into Hugging Face's `T5ForConditionalGeneration` (same logits), for benchmarks
against `generate` and for anyone who wants the trained model in the HF ecosystem.

transformers is imported inside the functions: the package does not need it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import EOS, PAD

if TYPE_CHECKING:
    from transformers import T5ForConditionalGeneration

# Our block's sublayers -> HF's T5Block.layer[i] (the decoder has cross-attention as layer 1)
_ENCODER_LAYERS = {"self_norm": "0.layer_norm", "self_attn": "0.SelfAttention", "ffn_norm": "1.layer_norm",
                   "ffn": "1.DenseReluDense"}
_DECODER_LAYERS = {"self_norm": "0.layer_norm", "self_attn": "0.SelfAttention", "cross_norm": "1.layer_norm",
                   "cross_attn": "1.EncDecAttention", "ffn_norm": "2.layer_norm", "ffn": "2.DenseReluDense"}
_BLOCK = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.([a-z_]+)\.(.+)")


def hf_name(name: str) -> str:
    """Our parameter name -> HF T5's ("decoder.blocks.1.cross_attn.q.weight" ->
    "decoder.block.1.layer.1.EncDecAttention.q.weight")."""
    if name in ("shared.weight", "lm_head.weight"):
        return name
    stack, _, rest = name.partition(".")
    if rest == "relative_bias.weight":  # HF keeps the table in block 0 (see RecommenderStack)
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if rest == "final_norm.weight":
        return f"{stack}.final_layer_norm.weight"
    match = _BLOCK.fullmatch(name)
    if match is None:
        raise KeyError(f"no HF T5 name for parameter {name!r}")
    stack, index, sublayer, tail = match.groups()
    layers = _ENCODER_LAYERS if stack == "encoder" else _DECODER_LAYERS
    return f"{stack}.block.{index}.layer.{layers[sublayer]}.{tail}"


def hf_state_dict(model: Recommender) -> dict[str, Tensor]:
    """Our weights under HF T5 names (detached; the tensors are shared with the model, not copied)."""
    return {hf_name(name): tensor.detach() for name, tensor in model.state_dict().items()}


def to_hf_t5(model: Recommender) -> T5ForConditionalGeneration:
    """A `T5ForConditionalGeneration` with our config and a copy of our weights, on our device and dtype,
    in our train/eval mode.

    transformers 5 always ties lm_head to the shared embedding and reads `tie_word_embeddings=False`
    as "do not scale the decoder output by d_model**-0.5" (T5 v1.1); our lm_head is untied, so it gets
    its own parameter here. `save_pretrained` keeps both; `from_pretrained` then loads them untied.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    c = model.config
    # both keywords reach T5Config.__post_init__ through @strict's **kwargs, which mypy does not see
    hf_config = T5Config(  # type: ignore[call-arg]
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
        num_decoder_layers=c.decoder_layers, num_heads=c.num_heads,
        relative_attention_num_buckets=c.rel_buckets, relative_attention_max_distance=c.rel_max_distance,
        dropout_rate=c.dropout, layer_norm_epsilon=c.eps, feed_forward_proj="relu",
        tie_word_embeddings=False, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
    )
    hf = T5ForConditionalGeneration(hf_config)
    hf.lm_head.weight = nn.Parameter(torch.empty_like(hf.lm_head.weight))  # untie
    state = hf_state_dict(model)
    expected = set(hf.state_dict())
    # the encoder's and decoder's embed_tokens are the shared embedding in HF as in ours
    missing = expected - set(state) - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if missing or set(state) - expected:
        raise RuntimeError(f"HF T5 parameters without ours: {sorted(missing)}; "
                           f"ours without HF's: {sorted(set(state) - expected)}")
    hf.load_state_dict(state, strict=False)
    assert hf.encoder.embed_tokens.weight is hf.shared.weight and hf.lm_head.weight is not hf.shared.weight
    weight = model.shared.weight
    # PreTrainedModel.to is @wraps(nn.Module.to), which hides `self` from mypy
    return hf.to(device=weight.device, dtype=weight.dtype).train(model.training)  # type: ignore[call-arg]
