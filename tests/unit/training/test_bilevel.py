"""The mathematics of the bi-level modes: soft assignments of a batch, the mixed representation, the
meta-gradient against finite differences and against a plain-autograd reference, gradient surgery (with
the official code's variant on a hand-computed case), no graph left behind, and the joint loss."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bloger_cli.data.samples import Samples
from bloger_cli.recommender.batch import Batch, make_batch
from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.model import Recommender, second_order
from bloger_cli.recommender.vocab import SPECIAL, Vocab
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.training.bilevel import (
    MetaResult,
    batch_items,
    joint_loss,
    meta_gradients,
    mixed_probs,
    rec_loss,
    surgery,
)

L, K, N, D = 2, 4, 7, 8  # tokenizer levels, codes per level, items, embedding width
HISTORY = [[1, 2, -1], [3, 4, 5], [6, -1, -1], [2, 2, 4]]  # item 0 is in no batch; item 2 twice in row 3
TARGET = [3, 6, 1, 5]


def setup(dtype: torch.dtype = torch.float32) -> tuple[RQVAE, Recommender, torch.Tensor, Batch, torch.Tensor]:
    """A tiny RQ-VAE, a tiny recommender (L' = L + 1: a disambiguation level), 7 items, a batch of 4
    samples, and the hard codes (N, L + 1)."""
    torch.manual_seed(0)
    tokenizer = RQVAE(RQVAEConfig(input_dim=D, code_dim=4, levels=L, codebook_size=K, hidden=[8])).to(dtype)
    model = Recommender(RecommenderConfig(levels=L + 1, codebook_size=K, soft_levels=L, d_model=8, num_layers=1,
                                          num_heads=2, d_kv=4, d_ff=16, dropout=0.0)).to(dtype)
    x = torch.randn(N, D, dtype=dtype)
    codes = torch.cat([tokenizer.codes(x), torch.arange(N)[:, None] % K], dim=1)  # (N, L + 1)
    samples = Samples(torch.arange(4), torch.tensor(HISTORY), torch.tensor(TARGET))
    return tokenizer, model, x, make_batch(samples, codes, Vocab(L + 1, K)), codes


def other_batch(codes: torch.Tensor) -> Batch:
    samples = Samples(torch.arange(3), torch.tensor([[0, 5, 6], [4, -1, -1], [3, 1, -1]]), torch.tensor([2, 0, 6]))
    return make_batch(samples, codes, Vocab(L + 1, K))


def hard_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                decoder_input_ids=batch.decoder_input_ids, labels=batch.labels)


def flat(grads: dict[str, torch.Tensor], tokenizer: RQVAE) -> torch.Tensor:
    return torch.cat([grads[name].flatten() for name, _ in tokenizer.named_parameters()])


# --- soft assignments of a batch -----------------------------------------------------------------------


def test_batch_items_leave_padding_out():
    *_, batch, _ = setup()
    items, history, target = batch_items(batch)
    assert items.tolist() == [1, 2, 3, 4, 5, 6]  # no item 0: padding is -1, not item 0
    real = batch.history >= 0
    assert torch.equal(items[history][real], batch.history[real]) and torch.equal(items[target], batch.target)


def test_mixed_probs_run_the_tokenizer_once_per_distinct_item(monkeypatch):
    tokenizer, _, x, batch, _ = setup()
    calls = []
    original = tokenizer.soft_assignments
    monkeypatch.setattr(tokenizer, "soft_assignments", lambda e, *a: calls.append(e.shape) or original(e, *a))
    input_probs, decoder_probs = mixed_probs(tokenizer, x, batch)
    assert calls == [(6, D)]
    assert input_probs.shape == (4, 3, L, K) and decoder_probs.shape == (4, L, K)
    real = batch.history >= 0
    assert torch.equal(input_probs[~real], torch.zeros(int((~real).sum()), L, K))  # padding slots
    torch.testing.assert_close(input_probs[real].sum(-1), torch.ones(int(real.sum()), L))
    torch.testing.assert_close(decoder_probs.sum(-1), torch.ones(4, L))
    assert torch.equal(input_probs[3, 0], input_probs[3, 1])  # item 2 twice in one history
    assert torch.equal(input_probs[0, 1], input_probs[3, 0])  # item 2 in two histories
    assert torch.equal(input_probs[1, 0], decoder_probs[0])  # item 3 in a history and as a target
    full = original(x)  # every item at once
    torch.testing.assert_close(input_probs[1], full[[3, 4, 5]])
    torch.testing.assert_close(decoder_probs, full[TARGET])


# --- the mixed representation ------------------------------------------------------------------------------


def test_the_mixed_representation_is_the_hard_loss_with_a_gradient_into_the_tokenizer():
    tokenizer, model, x, batch, _ = setup()
    probs = mixed_probs(tokenizer, x, batch)
    mixed = model(**hard_inputs(batch), input_probs=probs[0], decoder_probs=probs[1]).loss
    assert torch.equal(mixed, model(**hard_inputs(batch)).loss)
    assert torch.equal(rec_loss(model, dict(model.named_parameters()), batch, probs), mixed)
    names = [name for name, _ in tokenizer.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(mixed, list(tokenizer.parameters()), allow_unused=True)))
    for level in range(L):
        assert grads[f"quantizer.codebooks.{level}"].abs().sum() > 0
    encoder = [name for name in names if name.startswith("encoder.")]
    assert encoder and all(grads[name].abs().sum() > 0 for name in encoder)
    assert all(grads[name] is None for name in names if name.startswith("decoder."))  # x_hat is not in L_rec


# --- the meta-gradient ----------------------------------------------------------------------------------------


def soft_without_stop_gradient(self: Recommender, probs: torch.Tensor, first_level: int = 0) -> torch.Tensor:
    """Recommender._soft as probs @ E_l, without the straight-through's `- sg[probs]`: fed p(phi) - p(phi_0)
    it has the real one's value and derivatives at phi_0, and a value finite differences can see."""
    c = self.config
    rows = self.shared.weight[SPECIAL:SPECIAL + c.levels * c.codebook_size].view(c.levels, c.codebook_size, -1)
    return torch.einsum("...lk,lkd->...ld", probs, rows[first_level:first_level + probs.shape[-2]])


def lookahead_value(model: Recommender, tokenizer: RQVAE, x: torch.Tensor, batch: Batch, eta: float,
                    base: tuple[torch.Tensor, torch.Tensor]) -> float:
    """L_rec(theta - eta * grad_theta L_rec(theta, d), d), d = p(phi) - p(phi_0), on a copy of the model
    that takes the SGD step in place (no functional_call, no graph kept)."""
    probs = tuple(p.detach() - b for p, b in zip(mixed_probs(tokenizer, x, batch), base))
    fast = copy.deepcopy(model)
    loss = fast(**hard_inputs(batch), input_probs=probs[0], decoder_probs=probs[1]).loss
    grads = torch.autograd.grad(loss, list(fast.parameters()))
    with torch.no_grad():
        for p, g in zip(fast.parameters(), grads):
            p.sub_(eta * g)
        return float(fast(**hard_inputs(batch), input_probs=probs[0], decoder_probs=probs[1]).loss)


def tokenization_value(tokenizer: RQVAE, x: torch.Tensor, frozen: tuple[torch.Tensor, ...]) -> float:
    """RQVAE's L_tok with each stop-gradient replaced by its value at phi_0: frozen = (q - z, residuals,
    chosen code vectors) at phi_0. Same value and derivatives there as the straight-through loss."""
    shift, residuals, chosen = frozen
    with torch.no_grad():
        z = tokenizer.encode(x)
        q = tokenizer.quantizer(z)
        recon = (tokenizer.decode(z + shift) - x).pow(2).sum(1).mean()
        codebook = (residuals - q.chosen).pow(2).sum(2).mean(0).sum()
        commitment = (q.residuals - chosen).pow(2).sum(2).mean(0).sum()
        return float(recon + codebook + tokenizer.config.commitment * commitment)


def shift_parameters(tokenizer: RQVAE, direction: torch.Tensor, scale: float) -> None:
    with torch.no_grad():
        offset = 0
        for p in tokenizer.parameters():
            p.add_(scale * direction[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def test_meta_gradient_equals_finite_differences_in_float64(monkeypatch):
    tokenizer, model, x, batch, _ = setup(torch.float64)
    eta, lam, eps = 0.5, 0.5, 1e-6
    meta = meta_gradients(model, tokenizer, x, batch, eta=eta, lam=lam, surgery_method="none")
    analytic = flat(meta.grads, tokenizer)
    x_items = x[batch_items(batch)[0]]
    with torch.no_grad():
        base = mixed_probs(tokenizer, x, batch)
        z = tokenizer.encode(x_items)
        q = tokenizer.quantizer(z)
        frozen = (q.quantized - z, q.residuals, q.chosen)
        codes = tokenizer.codes(x)
    assert tokenization_value(tokenizer, x_items, frozen) == pytest.approx(meta.tok_loss, rel=1e-12)
    monkeypatch.setattr(Recommender, "_soft", soft_without_stop_gradient)
    assert lookahead_value(model, tokenizer, x, batch, 0.0, base) == pytest.approx(meta.inner_loss, rel=1e-12)
    assert lookahead_value(model, tokenizer, x, batch, eta, base) == pytest.approx(meta.outer_loss, rel=1e-12)

    def objective() -> float:
        assert torch.equal(tokenizer.codes(x), codes)  # the hard codes do not move under the perturbation
        return lookahead_value(model, tokenizer, x, batch, eta, base) + lam * tokenization_value(tokenizer, x_items,
                                                                                                 frozen)

    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = torch.randn(analytic.numel(), generator=g, dtype=torch.float64)
        shift_parameters(tokenizer, direction, eps)
        plus = objective()
        shift_parameters(tokenizer, direction, -2 * eps)
        minus = objective()
        shift_parameters(tokenizer, direction, eps)
        numeric, exact = (plus - minus) / (2 * eps), float(analytic @ direction)
        assert abs(exact) > 1e-3 and abs(numeric - exact) <= 1e-4 * abs(exact)


def plain_meta_gradient(model: Recommender, tokenizer: RQVAE, x: torch.Tensor, batch: Batch, meta_batch: Batch,
                        eta: float, lam: float) -> list[torch.Tensor]:
    """The same gradient without functional_call: theta' put into a copy of the model as plain tensors."""

    def probs(b: Batch) -> dict[str, torch.Tensor]:
        p = tokenizer.soft_assignments(x)  # (N, L, K): every item
        present = (b.history >= 0).to(p.dtype)[..., None, None]
        return dict(input_probs=p[b.history.clamp_min(0)] * present, decoder_probs=p[b.target])

    fast = copy.deepcopy(model)
    with second_order():
        inner = model(**hard_inputs(batch), **probs(batch)).loss
        grads = torch.autograd.grad(inner, list(model.parameters()), create_graph=True)
        for (name, p), g in zip(model.named_parameters(), grads):
            owner, _, leaf = name.rpartition(".")
            module = fast.get_submodule(owner)
            delattr(module, leaf)  # the Parameter goes, a non-leaf tensor that depends on phi takes its place
            setattr(module, leaf, p - eta * g)
        outer = fast(**hard_inputs(meta_batch), **probs(meta_batch)).loss
        rec = torch.autograd.grad(outer, list(tokenizer.parameters()), allow_unused=True)
    items = sorted(set(batch.history[batch.history >= 0].tolist()) | set(batch.target.tolist()))
    tok = torch.autograd.grad(tokenizer(x[items]).losses.total, list(tokenizer.parameters()))
    return [lam * t + (torch.zeros_like(t) if r is None else r) for r, t in zip(rec, tok)]


@pytest.mark.parametrize("same_batch", [True, False])
def test_meta_gradient_equals_a_plain_autograd_reference(same_batch):
    tokenizer, model, x, batch, codes = setup(torch.float64)
    meta_batch = batch if same_batch else other_batch(codes)
    meta = meta_gradients(model, tokenizer, x, batch, eta=0.3, lam=0.7, surgery_method="none",
                          meta_batch=None if same_batch else meta_batch)
    reference = plain_meta_gradient(model, tokenizer, x, batch, meta_batch, eta=0.3, lam=0.7)
    for (name, _), expected in zip(tokenizer.named_parameters(), reference):
        torch.testing.assert_close(meta.grads[name], expected, rtol=1e-9, atol=1e-12)
    # the decoder MLP gets no L_rec gradient, only lam * g_tok
    assert all(not meta.fired[n] and meta.cosine[n] == 0.0 for n in meta.grads if n.startswith("decoder."))


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("same_batch", [True, False])
def test_chunked_meta_gradient_equals_the_whole_batch_one(chunk, same_batch):
    # the Hessian-vector form by slices is the same gradient with a fraction of the second-order graph
    tokenizer, model, x, batch, codes = setup(torch.float64)
    meta_batch = None if same_batch else other_batch(codes)
    whole = meta_gradients(model, tokenizer, x, batch, eta=0.3, lam=0.7, surgery_method="none", meta_batch=meta_batch)
    sliced = meta_gradients(model, tokenizer, x, batch, eta=0.3, lam=0.7, surgery_method="none",
                            meta_batch=meta_batch, chunk=chunk)
    for name in whole.grads:
        torch.testing.assert_close(sliced.grads[name], whole.grads[name], rtol=1e-9, atol=1e-12)
    assert sliced.inner_loss == pytest.approx(whole.inner_loss) and sliced.outer_loss == pytest.approx(whole.outer_loss)
    assert all(p.grad is None for p in list(model.parameters()) + list(tokenizer.parameters()))


def test_meta_gradient_applies_surgery_per_tensor():
    tokenizer, model, x, batch, _ = setup(torch.float64)
    args = dict(eta=0.5, lam=0.5)
    plain = meta_gradients(model, tokenizer, x, batch, surgery_method="none", **args)
    tok = dict(zip([n for n, _ in tokenizer.named_parameters()],
                   torch.autograd.grad(tokenizer(x[batch_items(batch)[0]]).losses.total,
                                       list(tokenizer.parameters()))))
    for method in ("pcgrad", "official"):
        meta = meta_gradients(model, tokenizer, x, batch, surgery_method=method, **args)
        assert meta.cosine == pytest.approx(plain.cosine) and meta.conflict_fraction == plain.conflict_fraction
        for name, own in tok.items():
            rec = plain.grads[name] - 0.5 * own
            expected, cos, fired = surgery(rec, own, method)
            torch.testing.assert_close(meta.grads[name], 0.5 * own + expected, rtol=1e-9, atol=1e-12)
            assert meta.fired[name] == fired == (cos < 0)
    assert plain.conflict_fraction == sum(c < 0 for c in plain.cosine.values()) / len(plain.cosine)
    assert not any(plain.fired.values())


class GraphNodes(TorchFunctionMode):
    """Tags the autograd node of every tensor a torch function returns with a sentinel in its metadata:
    the sentinel lives exactly as long as the node (and references no tensor, so it makes no cycle)."""

    def __init__(self) -> None:
        super().__init__()
        self.sentinels: list[weakref.ref] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.grad_fn is not None and "sentinel" not in t.grad_fn.metadata:
                sentinel = Sentinel()
                t.grad_fn.metadata["sentinel"] = sentinel
                self.sentinels.append(weakref.ref(sentinel))
        return out


class Sentinel:
    pass


def test_meta_gradients_keep_no_graph_and_leave_no_grad_behind():
    tokenizer, model, x, batch, _ = setup()
    with GraphNodes() as kept:  # control: a loss held by the caller keeps its graph
        loss = joint_loss(model, tokenizer, x, batch, lam=0.5)[0]
    gc.collect()
    assert any(ref() is not None for ref in kept.sentinels)
    del loss
    with GraphNodes() as nodes:
        meta = meta_gradients(model, tokenizer, x, batch, eta=0.1, lam=0.5, surgery_method="pcgrad")
    gc.collect()
    assert len(nodes.sentinels) > 100 and all(ref() is None for ref in nodes.sentinels)  # every node is gone
    assert isinstance(meta, MetaResult) and set(meta.grads) == {n for n, _ in tokenizer.named_parameters()}
    for g in meta.grads.values():
        assert not g.requires_grad and g.grad_fn is None and torch.isfinite(g).all()
    assert all(isinstance(v, float) for v in (meta.inner_loss, meta.outer_loss, meta.tok_loss))
    assert all(p.grad is None for p in list(model.parameters()) + list(tokenizer.parameters()))


def test_unknown_surgery_is_refused():
    tokenizer, model, x, batch, _ = setup()
    message = "surgery must be one of pcgrad, none, official, got 'pc'"
    with pytest.raises(ValueError, match=f"^{message}$"):
        meta_gradients(model, tokenizer, x, batch, eta=0.1, lam=0.5, surgery_method="pc")
    with pytest.raises(ValueError, match=f"^{message}$"):
        surgery(torch.ones(2), torch.ones(2), "pc")


# --- gradient surgery -------------------------------------------------------------------------------------------


def test_pcgrad_removes_the_conflicting_component_only():
    g = torch.Generator().manual_seed(0)
    g_tok = torch.randn(5, 3, generator=g, dtype=torch.float64)
    conflicting = -g_tok + 0.3 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    projected, cos, fired = surgery(conflicting, g_tok, "pcgrad")
    assert fired and cos < 0
    assert abs(float((projected * g_tok).sum())) <= 1e-6 * float(conflicting.norm() * g_tok.norm())
    # what is left is g_rec minus a multiple of g_tok
    residual = conflicting - projected
    torch.testing.assert_close(residual, float((residual * g_tok).sum() / g_tok.pow(2).sum()) * g_tok)
    agreeing = g_tok + 0.3 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    same, cos, fired = surgery(agreeing, g_tok, "pcgrad")
    assert not fired and cos > 0 and torch.equal(same, agreeing)


def test_none_reports_the_conflict_but_changes_nothing():
    g_rec, g_tok = torch.tensor([1.0, -3.0]), torch.tensor([0.0, 1.0])
    kept, cos, fired = surgery(g_rec, g_tok, "none")
    assert torch.equal(kept, g_rec) and cos == pytest.approx(-3 / 10**0.5) and not fired


@pytest.mark.parametrize("method", ["pcgrad", "official"])
def test_a_zero_tokenizer_gradient_projects_nothing(method):
    g_rec = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    out, cos, fired = surgery(g_rec, torch.zeros(2, 2), method)
    assert torch.equal(out, g_rec) and cos == 0.0 and not fired


def test_official_surgery_normalises_each_row_of_g_tok():
    # g_rec = [[-1, 0], [0, -1]], g_tok = [[3, 4], [0, 1]]: <g_rec, g_tok> = -3 - 1 = -4 < 0, a conflict.
    # official (Ten-Mao/BLOGER run_gr_rec_blo.py): u = rows of g_tok over their norms 5 and 1
    #   = [[0.6, 0.8], [0, 1]]; <g_rec, u> = -0.6 - 1 = -1.6; g_rec - (-1.6) u = [[-0.04, 1.28], [0, 0.6]].
    # pcgrad: ||g_tok||^2 = 26; g_rec + 4/26 g_tok = [[-7/13, 8/13], [0, -11/13]], orthogonal to g_tok;
    # the official result is not: <[[-0.04, 1.28], [0, 0.6]], g_tok> = -0.12 + 5.12 + 0.6 = 5.6.
    g_rec = torch.tensor([[-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    g_tok = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    official, cos, fired = surgery(g_rec, g_tok, "official")
    assert fired and cos == pytest.approx(-4 / (2**0.5 * 26**0.5))
    torch.testing.assert_close(official, torch.tensor([[-0.04, 1.28], [0.0, 0.6]], dtype=torch.float64))
    assert float((official * g_tok).sum()) == pytest.approx(5.6)
    pcgrad, _, _ = surgery(g_rec, g_tok, "pcgrad")
    torch.testing.assert_close(pcgrad, torch.tensor([[-7 / 13, 8 / 13], [0.0, -11 / 13]], dtype=torch.float64))
    # a vector has one row: both are the same projection
    v_rec, v_tok = torch.tensor([1.0, -3.0]), torch.tensor([2.0, 1.0])
    torch.testing.assert_close(surgery(v_rec, v_tok, "official")[0], surgery(v_rec, v_tok, "pcgrad")[0])


def test_official_surgery_on_a_codebook_replaces_the_recommendation_gradient():
    # DESIGN.md: a 256 x 32 codebook gradient at cosine -0.7 comes back near cosine +0.99, ~178x the norm
    g = torch.Generator().manual_seed(0)
    g_tok = torch.randn(256, 32, generator=g)
    other = torch.randn(256, 32, generator=g)
    other -= (other * g_tok).sum() / g_tok.pow(2).sum() * g_tok
    g_rec = -0.7 * g_tok / g_tok.norm() + (1 - 0.49) ** 0.5 * other / other.norm()
    out, cos, _ = surgery(g_rec, g_tok, "official")
    assert cos == pytest.approx(-0.7, abs=1e-5)
    after = float((out * g_tok).sum() / (out.norm() * g_tok.norm()))
    assert after > 0.98 and 160 < float(out.norm() / g_rec.norm()) < 200


# --- the joint loss ----------------------------------------------------------------------------------------------


def test_joint_loss_is_the_mixed_rec_loss_plus_lam_tok_and_reaches_both_models():
    tokenizer, model, x, batch, _ = setup()
    total, rec, tok = joint_loss(model, tokenizer, x, batch, lam=0.5)
    assert torch.equal(rec, model(**hard_inputs(batch)).loss)
    assert torch.equal(tok, tokenizer(x[[1, 2, 3, 4, 5, 6]]).losses.total)
    assert torch.equal(total, rec + 0.5 * tok)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tokenizer.parameters())
    assert model.shared.weight.grad.abs().sum() > 0


# --- switches of the official code: residual routing, L_tok normalisation ---------------------------------


def test_official_routing_moves_only_each_levels_own_codebook():
    tokenizer, *_ , x, _, _ = setup()
    weights = torch.randn(N, L, K)

    def grads(routing: str) -> dict[str, torch.Tensor | None]:
        p = tokenizer.soft_assignments(x, routing)  # (N, L, K)
        loss = (p[:, 1:] * weights[:, 1:]).sum()  # levels >= 2 only
        names, params = zip(*tokenizer.named_parameters())
        return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))

    official, full = grads("official"), grads("full")
    encoder = [n for n in official if n.startswith("encoder.")]
    assert all(official[n] is None or not official[n].any() for n in encoder)  # the encoder gets nothing
    assert official["quantizer.codebooks.0"] is None or not official["quantizer.codebooks.0"].any()
    assert official["quantizer.codebooks.1"].abs().sum() > 0  # level 2 moves its own codebook
    assert any(full[n] is not None and full[n].abs().sum() > 0 for n in encoder)  # today's routing does
    torch.testing.assert_close(tokenizer.soft_assignments(x, "official"), tokenizer.soft_assignments(x))  # same values


def test_mean_tokenizer_loss_divides_each_term_by_its_width():
    tokenizer, *_ , x, _, _ = setup()
    losses = tokenizer(x).losses
    expected = losses.recon / D + (losses.codebook + 0.25 * losses.commitment) / 4
    torch.testing.assert_close(tokenizer.loss(x, "mean"), expected)
    torch.testing.assert_close(tokenizer.loss(x, "sum"), losses.total)
