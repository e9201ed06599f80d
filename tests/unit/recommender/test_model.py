"""The recommender model: shapes and loss, padding, functional_call and second-order gradients, the KV
cache and W candidates against plain decoding, the mixed representation, autocast, init and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.model import DecoderCache, Memory, Recommender, RecommenderOutput, second_order
from bloger_cli.recommender.vocab import EOS, PAD

LEVELS, K, SOFT = 3, 4, 2  # L' tokens per item, K codes, L soft levels
B, ITEMS = 2, 2  # users, history items per user (S = ITEMS * L')


def tiny_config(**overrides) -> RecommenderConfig:
    fields = dict(levels=LEVELS, codebook_size=K, soft_levels=SOFT, d_model=16, num_layers=2, num_heads=2,
                  d_kv=8, d_ff=32)
    return RecommenderConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Recommender:
    torch.manual_seed(seed)
    return Recommender(tiny_config(**overrides))


def tiny_batch(model: Recommender, seed: int = 0) -> dict[str, torch.Tensor]:
    """Histories of 2 items (user 1's first item is padding), targets as [PAD, codes] -> [codes, EOS]."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab
    input_ids = vocab.tokens(torch.randint(0, K, (B, ITEMS, LEVELS), generator=g)).flatten(1)  # (B, S)
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)  # (B, S)
    attention_mask[1, :LEVELS] = False
    input_ids[1, :LEVELS] = PAD
    target = vocab.tokens(torch.randint(0, K, (B, LEVELS), generator=g))  # (B, L')
    decoder_input_ids = torch.cat([torch.full((B, 1), PAD), target], dim=1)  # (B, L'+1)
    labels = torch.cat([target, torch.full((B, 1), EOS)], dim=1)  # (B, L'+1)
    labels[1, -1] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                labels=labels)


def random_probs(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).softmax(-1).requires_grad_(requires_grad)


# --- shapes, loss, padding ----------------------------------------------------------------------------


def test_shapes_and_loss():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    V, S, T = model.config.vocab_size, ITEMS * LEVELS, LEVELS + 1
    assert V == 2 + LEVELS * K
    memory = model.encode(batch["input_ids"], batch["attention_mask"])
    assert isinstance(memory, Memory)
    assert memory.hidden.shape == (B, S, 16) and memory.mask.shape == (B, S) and memory.mask.dtype == torch.bool
    tokens = batch["decoder_input_ids"].unsqueeze(1).expand(B, 3, T)  # (B, W=3, T)
    hidden, cache = model.decode(memory, tokens)
    assert hidden.shape == (B, 3, T, 16) and cache is None
    assert model.logits(hidden).shape == (B, 3, T, V) and model.logits(hidden).dtype == torch.float32
    out = model(**batch)
    assert isinstance(out, RecommenderOutput) and out.logits.shape == (B, T, V)
    expected = F.cross_entropy(out.logits.reshape(-1, V), batch["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert model(**{**batch, "labels": None}).loss is None


def test_padding_tokens_do_not_change_the_logits():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    other = batch["input_ids"].clone()
    other[~batch["attention_mask"]] = torch.arange(2, 2 + LEVELS)  # real code tokens at masked positions
    with torch.no_grad():
        torch.testing.assert_close(model(**{**batch, "input_ids": other}).logits, model(**batch).logits)


# --- functional_call and second order -------------------------------------------------------------------


def test_functional_call_with_own_params_equals_forward():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    out = functional_call(model, dict(model.named_parameters()), (), batch)
    assert torch.equal(out.logits, model(**batch).logits) and torch.equal(out.loss, model(**batch).loss)


def test_functional_call_with_perturbed_params_equals_a_model_holding_them():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    g = torch.Generator().manual_seed(1)
    params = {name: p + 0.1 * torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    other = copy.deepcopy(model)
    other.load_state_dict(params)
    out = functional_call(model, params, (), batch)
    torch.testing.assert_close(out.logits, other(**batch).logits, rtol=0, atol=1e-6)
    assert not torch.allclose(out.logits, model(**batch).logits)


def meta_gradient(model: Recommender, batch: dict, phi: torch.Tensor, second: bool, eta: float = 0.5):
    """d L(theta') / d phi with theta' = theta - eta grad_theta L(theta, phi); phi (B, ITEMS + 1, L, K)
    are the logits of the soft assignments of the history items and of the target."""
    probs = phi.softmax(-1)
    kwargs = dict(batch, input_probs=probs[:, :ITEMS], decoder_probs=probs[:, ITEMS])
    params = dict(model.named_parameters())
    torch.manual_seed(0)  # the same dropout masks in both variants
    loss = functional_call(model, params, (), kwargs).loss
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=second)
    fast = {name: p - eta * g for (name, p), g in zip(params.items(), grads)}
    (grad,) = torch.autograd.grad(functional_call(model, fast, (), kwargs).loss, phi)
    return grad


@pytest.mark.parametrize("dropout", [0.1, 0.0])  # without dropout SDPA on CPU picks a fused kernel
def test_second_order_gradient_through_functional_call_reaches_the_soft_assignments(dropout):
    model = tiny_model(dropout=dropout).train()
    batch = tiny_batch(model)
    phi = torch.randn(B, ITEMS + 1, SOFT, K, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with second_order():
        full = meta_gradient(model, batch, phi, second=True)
    first = meta_gradient(model, batch, phi, second=False)  # theta' without its dependence on phi
    assert torch.isfinite(full).all() and full.abs().sum() > 0
    assert not torch.allclose(full, first)  # the second-order path contributes


# --- decoding: KV cache and W candidates -------------------------------------------------------------------


def test_cached_steps_with_reorders_equal_decoding_the_full_sequences():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    g = torch.Generator().manual_seed(3)
    W, vocab = 3, model.config.vocab
    with torch.no_grad():
        memory = model.encode(batch["input_ids"], batch["attention_mask"])
        seqs = torch.full((B, 1, 1), PAD)  # (B, W=1, t=1)
        hidden, cache = model.decode(memory, seqs, use_cache=True)
        for level in range(LEVELS):
            full, _ = model.decode(memory, seqs)  # (B, W, t, D) without a cache
            torch.testing.assert_close(model.logits(hidden[:, :, -1]), model.logits(full[:, :, -1]),
                                       rtol=0, atol=1e-5)
            parent = torch.randint(0, seqs.shape[1], (B, W), generator=g)  # (B, W)
            step = vocab.offset(level) + torch.randint(0, K, (B, W, 1), generator=g)  # (B, W, 1)
            seqs = torch.cat([seqs[torch.arange(B)[:, None], parent], step], dim=2)  # (B, W, t+1)
            before = cache
            cache = cache.reorder(parent)
            hidden, cache = model.decode(memory, step, cache=cache, use_cache=True)
            assert before.length == level + 1 and cache.length == level + 2  # caches are not mutated
        full, _ = model.decode(memory, seqs)
        torch.testing.assert_close(model.logits(hidden[:, :, -1]), model.logits(full[:, :, -1]), rtol=0, atol=1e-5)
    assert cache.cross_kv[0][0].shape == (B, 2, ITEMS * LEVELS, 8)  # one per user, never per beam
    assert cache.self_kv[0][0].shape == (B * W, 2, LEVELS + 1, 8)


def test_w_candidates_equal_decoding_each_candidate_alone():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    vocab = model.config.vocab
    codes = torch.randint(0, K, (B, 4, LEVELS), generator=torch.Generator().manual_seed(4))
    tokens = torch.cat([torch.full((B, 4, 1), PAD), vocab.tokens(codes)], dim=2)  # (B, W=4, L'+1)
    probs = random_probs(B, 4, SOFT, K)
    with torch.no_grad():
        memory = model.encode(batch["input_ids"], batch["attention_mask"])
        together, _ = model.decode(memory, tokens, probs)  # (B, 4, L'+1, D)
        for w in range(4):
            alone, _ = model.decode(memory, tokens[:, w:w + 1], probs[:, w:w + 1])
            torch.testing.assert_close(together[:, w:w + 1], alone, rtol=0, atol=1e-6)


# --- the mixed representation ----------------------------------------------------------------------------


def test_mixed_embedding_is_the_hard_embedding_in_value_with_a_gradient_on_soft_levels_only():
    model = tiny_model()
    tokens = tiny_batch(model)["input_ids"]  # (B, S)
    probs = random_probs(B, ITEMS, SOFT, K, requires_grad=True)
    mixed = model.embed(tokens, probs)  # (B, S, D)
    assert torch.equal(mixed, model.embed(tokens))
    level = torch.arange(tokens.shape[1]) % LEVELS  # (S,)
    (soft_grad,) = torch.autograd.grad(mixed[:, level < SOFT].sum(), probs, retain_graph=True)
    (hard_grad,) = torch.autograd.grad(mixed[:, level >= SOFT].pow(2).sum(), probs)
    assert soft_grad.abs().sum() > 0 and torch.equal(hard_grad, torch.zeros_like(hard_grad))


def test_mixed_representation_leaves_the_forward_value_unchanged():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    input_probs = random_probs(B, ITEMS, SOFT, K, requires_grad=True)
    decoder_probs = random_probs(B, SOFT, K, seed=1, requires_grad=True)
    out = model(**batch, input_probs=input_probs, decoder_probs=decoder_probs)
    assert torch.equal(out.logits, model(**batch).logits)
    grads = torch.autograd.grad(out.loss, [input_probs, decoder_probs], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    # decoder position 0 is the start token: no soft part, so its logits do not depend on the target's probs
    (start_grad,) = torch.autograd.grad(out.logits[:, 0].sum(), decoder_probs)
    assert torch.equal(start_grad, torch.zeros_like(start_grad))


class ShapeRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_soft_embeddings_never_build_a_vocabulary_wide_tensor():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    V = model.config.vocab_size  # 14: no other dimension of this test is 14
    with ShapeRecorder() as recorder:
        model.encode(batch["input_ids"], batch["attention_mask"], random_probs(B, ITEMS, SOFT, K))
        model.decode(Memory(torch.zeros(B, 6, 16), batch["attention_mask"]),
                     batch["decoder_input_ids"].unsqueeze(1), random_probs(B, 1, SOFT, K))
    assert recorder.shapes and not [shape for shape in recorder.shapes if V in shape]


# --- autocast, init, errors ------------------------------------------------------------------------------


def test_bf16_autocast_keeps_logits_float32_and_close_to_fp32():
    model = tiny_model().eval()
    batch = tiny_batch(model)
    reference = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, input_probs=random_probs(B, ITEMS, SOFT, K))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.loss, reference, rtol=0.05, atol=0.05)


def test_init_follows_hf_t5():
    torch.manual_seed(0)
    config = RecommenderConfig(levels=4, codebook_size=256, soft_levels=3)  # the paper's sizes
    model = Recommender(config)
    d, dk, h, ff = config.d_model, config.d_kv, config.num_heads, config.d_ff
    expected = {"q": (d * dk) ** -0.5, "k": d**-0.5, "v": d**-0.5, "o": (h * dk) ** -0.5, "wi": d**-0.5,
                "wo": ff**-0.5, "relative_bias": d**-0.5, "shared": 1.0, "lm_head": 1.0}
    for name, p in model.named_parameters():
        key = name.split(".")[-2]
        if key.endswith("norm"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() / expected[key] - 1) < 0.1, name


def test_bad_config_and_inputs_are_refused_with_both_values():
    with pytest.raises(ValueError, match=r"soft_levels \(1\) must be levels \(3\) or levels - 1"):
        tiny_config(soft_levels=1)
    model = tiny_model().eval()
    batch = tiny_batch(model)
    with pytest.raises(ValueError, match=r"probs have shape \(2, 2, 3, 4\), tokens \(2, 6\) need \(2, 2, 2, 4\)"):
        model.encode(batch["input_ids"], batch["attention_mask"], torch.zeros(B, ITEMS, LEVELS, K))
    memory = model.encode(batch["input_ids"], batch["attention_mask"])
    _, cache = model.decode(memory, torch.zeros(B, 1, 1, dtype=torch.long), use_cache=True)
    assert isinstance(cache, DecoderCache) and cache.width == 1
    with pytest.raises(ValueError, match=r"tokens have B=2, W=3, the cache B=2, W=1"):
        model.decode(memory, torch.zeros(B, 3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"reorder index has shape \(3, 2\), the cache holds 2 users"):
        cache.reorder(torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("attention_dropout, stochastic", [(0.5, True), (0.0, False)])
def test_attention_dropout_is_separate_from_the_other_dropouts(attention_dropout, stochastic):
    model = tiny_model(dropout=0.0, attention_dropout=attention_dropout).train()
    batch = tiny_batch(model)
    first, second = model(**batch).logits, model(**batch).logits
    assert (not torch.equal(first, second)) == stochastic
    model.eval()
    assert torch.equal(model(**batch).logits, model(**batch).logits)


def test_soft_assignments_leave_the_gradient_of_every_weight_unchanged():
    # the straight-through is on p: the recommender's own gradients are those of the hard tokens
    model = tiny_model().eval()
    batch = tiny_batch(model)
    params = [p for p in model.parameters()]
    plain = torch.autograd.grad(model(**batch).loss, params)
    probs = (random_probs(B, ITEMS, SOFT, K, requires_grad=True), random_probs(B, SOFT, K, seed=1, requires_grad=True))
    mixed = torch.autograd.grad(model(**batch, input_probs=probs[0], decoder_probs=probs[1]).loss, params)
    for a, b in zip(plain, mixed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
