"""The RQ-VAE item tokenizer of DESIGN.md section 1, built bottom-up: distances -> MLP -> residual
quantizer -> RQ-VAE. `RQVAEConfig` is the whole contract; the checkpoint stores it beside the weights.

    x (B, D) --encoder--> z (B, d) --L levels of K codes--> codes (B, L), quantised sum q (B, d)
    q --decoder--> x_hat (B, D)

At level l the residual r_l (r_1 = z) gets p_l = softmax(-||r_l - e_k||^2) over the K codes, the hard
code c_l = argmax p_l, and r_{l+1} = r_l - e_{c_l}. The residual keeps its gradient (no straight-through
between levels), so p_l is differentiable w.r.t. the encoder and the codebooks of levels < l as well as
level l: the bi-level method (DESIGN section 1, "mixed representation") backpropagates through it.
Loss: ||x - x_hat||^2 + sum_l (||sg[r_l] - e_{c_l}||^2 + mu ||r_l - sg[e_{c_l}]||^2), each squared norm
summed over coordinates and averaged over the batch (DESIGN's norms). Not F.mse_loss's mean over
coordinates: on unit-norm 384-d text embeddings that divides the reconstruction term by 384 but the
quantisation terms only by 32, and on Beauty (12,101 MiniLM embeddings, defaults) the quantisation terms
then win: without dead-code re-seeding every item ended on one code, with it levels 3-4 kept only 26% and
8% of their codes; with summed norms all four levels use 100% and the reconstruction MSE is 16% lower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def squared_distances(r: Tensor, codebook: Tensor) -> Tensor:
    """||r_b - e_k||^2 as ||r||^2 - 2 r E^T + ||E||^2: (B, d) x (K, d) -> (B, K), never a (B, K, d) tensor."""
    r2 = r.pow(2).sum(dim=1, keepdim=True)  # (B, 1)
    e2 = codebook.pow(2).sum(dim=1)  # (K,)
    d2 = torch.addmm(r2 + e2, r, codebook.t(), alpha=-2.0)  # (B, K)
    return d2.clamp_min(0.0)  # cancellation can leave tiny negatives


def default_hidden(input_dim: int, code_dim: int) -> list[int]:
    """Encoder widths halving from the largest power of two below D while they stay >= 2 d.

    384 -> [256, 128, 64]; 4096 -> [2048, 1024, 512, 256, 128, 64] (the paper's, for d = 32).
    """
    widths: list[int] = []
    width = 1 << max(input_dim - 1, 1).bit_length() - 1  # largest power of two < D (1 for D <= 2)
    while width >= 2 * code_dim:
        widths.append(width)
        width //= 2
    return widths


@dataclass
class RQVAEConfig:
    """Everything that fixes the model's shapes and loss (plain values: it goes into the checkpoint)."""

    input_dim: int  # D: the embedding width, read from the embeddings artifact
    code_dim: int = 32  # d
    levels: int = 4  # L
    codebook_size: int = 256  # K
    hidden: list[int] = field(default_factory=list)  # encoder widths; the decoder mirrors them
    dropout: float = 0.0
    commitment: float = 0.25  # mu

    @classmethod
    def resolve(cls, input_dim: int, code_dim: int, levels: int, codebook_size: int,
                hidden: list[int] | None, dropout: float, commitment: float) -> RQVAEConfig:
        widths = default_hidden(input_dim, code_dim) if hidden is None else list(hidden)
        return cls(input_dim, code_dim, levels, codebook_size, widths, dropout, commitment)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLP(nn.Sequential):
    """Linear layers with ReLU (and dropout) between them; the last layer is linear."""

    def __init__(self, widths: list[int], dropout: float) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # (B, d) sum_l e_{c_l}
    codes: Tensor  # (B, L) int64
    probs: Tensor  # (B, L, K) soft assignments p_l
    residuals: Tensor  # (B, L, d) r_l, the input of each level
    chosen: Tensor  # (B, L, d) e_{c_l}, the code vector picked at each level


class ResidualQuantizer(nn.Module):
    """L codebooks of K vectors of width d (one parameter tensor per level, for per-tensor surgery)."""

    def __init__(self, levels: int, codebook_size: int, code_dim: int) -> None:
        super().__init__()
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.randn(codebook_size, code_dim) / code_dim**0.5) for _ in range(levels)]
        )

    @property
    def levels(self) -> int:
        return len(self.codebooks)

    def forward(self, z: Tensor, *, with_probs: bool = True) -> QuantizerOutput:
        residual = z  # r_1 (B, d)
        codes, probs, residuals, chosen = [], [], [], []
        for codebook in self.codebooks:  # codebook (K, d)
            d2 = squared_distances(residual, codebook)  # (B, K)
            code = d2.argmin(dim=1)  # (B,) == argmax of softmax(-d2)
            if with_probs:
                probs.append(torch.softmax(-d2, dim=1))
            # Not codebook[code]: its backward (index_put_ with accumulate) gave different codebook
            # gradients from run to run on 2 CPU threads and took 20 ms at B = 1024, K = 256; embedding's
            # backward is deterministic here and took 0.1 ms (on CUDA it is the sort-based kernel; not
            # checked on a GPU for this project yet).
            e = F.embedding(code, codebook)  # (B, d)
            residuals.append(residual)
            chosen.append(e)
            codes.append(code)
            residual = residual - e  # r_{l+1}, gradient kept (see module docstring)
        chosen_t = torch.stack(chosen, dim=1)  # (B, L, d)
        prob_t = torch.stack(probs, dim=1) if with_probs else z.new_empty(0)  # (B, L, K)
        return QuantizerOutput(chosen_t.sum(dim=1), torch.stack(codes, dim=1), prob_t,
                               torch.stack(residuals, dim=1), chosen_t)

    def soft_probs(self, z: Tensor, routing: str = "full") -> Tensor:
        """p_l of every level (B, d) -> (B, L, K). routing "full": as `forward` (the residual keeps its
        gradient); "official": r_{l+1} is detached, as the official code's quantizer does
        (github.com/Ten-Mao/BLOGER, model/id/rq.py), so p_l for l >= 2 moves only codebook l."""
        if routing == "full":
            return self(z).probs
        residual, probs = z, []
        for codebook in self.codebooks:
            d2 = squared_distances(residual, codebook)  # (B, K)
            probs.append(torch.softmax(-d2, dim=1))
            residual = (residual - F.embedding(d2.argmin(dim=1), codebook)).detach()
        return torch.stack(probs, dim=1)  # (B, L, K)

    @torch.no_grad()
    def assign(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inference path keeping one residual: codes (B, L), quantised sum (B, d), ||r_{l+1}||^2 (B, L).

        Same codes as forward (same distances, same residual updates) without the (B, L, d) stacks,
        which for residual k-means on 384-d embeddings were 400 MiB each per 65,536-item chunk.
        """
        residual = z  # (B, d)
        codes, errors = [], []
        for codebook in self.codebooks:
            code = squared_distances(residual, codebook).argmin(dim=1)  # (B,)
            residual = residual - F.embedding(code, codebook)
            codes.append(code)
            errors.append(residual.pow(2).sum(dim=1))
        return torch.stack(codes, dim=1), z - residual, torch.stack(errors, dim=1)


class RQVAELoss(NamedTuple):
    total: Tensor  # recon + codebook + mu * commitment
    recon: Tensor  # mean over the batch of ||x - x_hat||^2
    codebook: Tensor  # sum_l of the batch mean of ||sg[r_l] - e_{c_l}||^2
    commitment: Tensor  # sum_l of the batch mean of ||r_l - sg[e_{c_l}]||^2, before the weight mu


def quantization_losses(q: QuantizerOutput) -> tuple[Tensor, Tensor]:
    """(codebook term, commitment term): squared norms averaged over the batch, summed over levels."""
    r, e = q.residuals, q.chosen  # (B, L, d) each
    codebook = (r.detach() - e).pow(2).sum(dim=2).mean(dim=0).sum()
    commitment = (r - e.detach()).pow(2).sum(dim=2).mean(dim=0).sum()
    return codebook, commitment


class RQVAEOutput(NamedTuple):
    x_hat: Tensor  # (B, D)
    z: Tensor  # (B, d)
    codes: Tensor  # (B, L) int64
    probs: Tensor  # (B, L, K)
    residuals: Tensor  # (B, L, d) r_l before each level
    losses: RQVAELoss


class RQVAE(nn.Module):
    """Encoder D -> hidden -> d, residual quantizer, decoder d -> reversed hidden -> D."""

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.input_dim, *config.hidden, config.code_dim]
        self.encoder = MLP(widths, config.dropout)
        self.quantizer = ResidualQuantizer(config.levels, config.codebook_size, config.code_dim)
        self.decoder = MLP(widths[::-1], config.dropout)

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # (B, D) -> (B, d)

    def decode(self, quantized: Tensor) -> Tensor:
        return self.decoder(quantized)  # (B, d) -> (B, D)

    def forward(self, x: Tensor, *, with_probs: bool = True) -> RQVAEOutput:
        z = self.encode(x)  # (B, d)
        q = self.quantizer(z, with_probs=with_probs)
        z_q = z + (q.quantized - z).detach()  # straight-through: forward q, gradient into the encoder
        x_hat = self.decode(z_q)  # (B, D)
        recon = (x_hat - x).pow(2).sum(dim=1).mean()
        codebook, commitment = quantization_losses(q)
        total = recon + codebook + self.config.commitment * commitment
        return RQVAEOutput(x_hat, z, q.codes, q.probs, q.residuals, RQVAELoss(total, recon, codebook, commitment))

    def soft_assignments(self, x: Tensor, routing: str = "full") -> Tensor:
        """p_l for every level: (B, D) -> (B, L, K), differentiable w.r.t. encoder and codebooks (with
        routing "official", level l >= 2 only w.r.t. its own codebook: `ResidualQuantizer.soft_probs`)."""
        return self.quantizer.soft_probs(self.encode(x), routing)

    def loss(self, x: Tensor, norm: str = "sum") -> Tensor:
        """L_tok of a batch. norm "sum": `losses.total`, squared errors summed over coordinates (what
        `tokenize` trains on); "mean": each term averaged over its coordinates (reconstruction over D,
        quantisation over d), the official code's F.mse_loss, which weighs far less against L_rec."""
        losses = self(x).losses
        if norm == "sum":
            return losses.total
        return losses.recon / self.config.input_dim + \
            (losses.codebook + self.config.commitment * losses.commitment) / self.config.code_dim

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Hard codes (B, D) -> (B, L) int64, no probabilities built (call .eval() first if dropout > 0)."""
        return self.quantizer.assign(self.encode(x))[0]
