"""Seeded, batched k-means in torch, residual k-means, and the encoder-free `RQKMeans` tokenizer.

k-means initialises the RQ-VAE codebooks level by level (DESIGN section 1) and is, as residual k-means
directly on the embeddings, the `rq-kmeans` method: a fast baseline and a fallback for huge catalogs.
Everything is deterministic given a torch.Generator: k-means++ seeding draws from the CPU generator,
centroid sums avoid GPU atomics (order-dependent), and empty clusters take the points farthest from
their centroids. Assignment runs in chunks (`chunk_rows`): one (chunk, K) distance matrix at a time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bloger_cli.errors import DataError
from bloger_cli.tokenizer.rqvae import ResidualQuantizer

log = logging.getLogger(__name__)

CHUNK_CPU = 4_096  # rows per (chunk, K) distance matrix on the CPU: 4 MiB at K = 256
CHUNK_GPU = 65_536  # on GPUs: 64 MiB at K = 256, big enough to keep the device busy
POINTS_PER_CODE = 256  # k-means fits on at most K x this many points (faiss's default sample size)


def chunk_rows(device: torch.device) -> int:
    """Rows per chunk. On the CPU small chunks win: tensors over glibc's 32 MiB mmap threshold are
    mapped and unmapped on every allocation, and assigning 300k items in chunks of 65,536 took 2.5x
    as long as in chunks of 4,096 (page faults: 1.6M vs 0) on this project's 2-core machine."""
    return CHUNK_CPU if device.type == "cpu" else CHUNK_GPU


def assign_nearest(x: Tensor, centroids: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid per row, in chunks: (N, d), (K, d) -> codes (N,) int64, squared distance (N,).

    ||r||^2 is the same for every centroid, so it is added after the min: one (B, K) pass fewer.
    """
    chunk = chunk or chunk_rows(x.device)
    codes = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    e2 = centroids.pow(2).sum(dim=1)  # (K,)
    for start in range(0, x.shape[0], chunk):
        r = x[start:start + chunk]  # (B, d)
        partial = torch.addmm(e2, r, centroids.t(), alpha=-2.0)  # (B, K) ||e||^2 - 2 r.e
        low, codes[start:start + chunk] = partial.min(dim=1)
        dist[start:start + chunk] = (low + r.pow(2).sum(dim=1)).clamp_min(0.0)
    return codes, dist


def _distances_to(x: Tensor, x2: Tensor, c: Tensor) -> Tensor:
    """||x_n - c||^2 for one centroid: (N, d), (N,), (d,) -> (N,); one matrix-vector product, no (N, d) temporaries."""
    return torch.addmv(x2 + c.pow(2).sum(), x, c, alpha=-2.0).clamp_min(0.0)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling): (N, d) -> (K, d).

    Each draw is an inverse-CDF lookup of one uniform number from the CPU generator, so the sequence
    depends only on the seed and the data, on any device.
    """
    n = x.shape[0]
    x2 = x.pow(2).sum(dim=1)  # (N,) computed once; each step adds one (N,) distance column
    centroids = x.new_empty(k, x.shape[1])
    centroids[0] = x[int(torch.randint(n, (1,), generator=generator))]
    best = _distances_to(x, x2, centroids[0])  # (N,) to the nearest seed so far
    for i in range(1, k):
        cumulative = best.double().cumsum(0)  # (N,)
        u = torch.rand((), dtype=torch.float64, generator=generator)
        if float(cumulative[-1]) > 0:
            pick = min(int(torch.searchsorted(cumulative, u.to(x.device) * cumulative[-1], right=True)), n - 1)
        else:  # every point coincides with a seed (duplicated inputs): any point will do
            pick = min(int(u * n), n - 1)
        centroids[i] = x[pick]
        best = torch.minimum(best, _distances_to(x, x2, centroids[i]))
    return centroids


def _cluster_sums(x: Tensor, codes: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums (K, d) and counts (K,).

    On the CPU index_add_ is sequential, hence deterministic, and 60x faster than the alternative; on
    GPUs it uses atomic adds whose order varies, so there the sums are one-hot matmuls per chunk.
    """
    if x.device.type == "cpu":
        counts = torch.bincount(codes, minlength=k).to(x.dtype)
        return x.new_zeros(k, x.shape[1]).index_add_(0, codes, x), counts
    sums = x.new_zeros(k, x.shape[1])
    counts = x.new_zeros(k)
    for start in range(0, x.shape[0], chunk):
        onehot = F.one_hot(codes[start:start + chunk], k).to(x.dtype)  # (B, K)
        sums += onehot.t() @ x[start:start + chunk]  # (K, d)
        counts += onehot.sum(dim=0)
    return sums, counts


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator, chunk: int | None = None) -> Tensor:
    """Lloyd's k-means from k-means++ seeds: (N, d) -> centroids (K, d).

    Stops early when no assignment changes. Fewer points than K is a DataError.
    """
    n = x.shape[0]
    if n < k:
        raise DataError(f"k-means cannot initialise {k} codes from {n} items",
                        hint=f"lower --codebook-size to at most {n}")
    chunk = chunk or chunk_rows(x.device)
    centroids = kmeans_plus_plus(x, k, generator)
    codes, dist = assign_nearest(x, centroids, chunk)
    for _ in range(iters):
        sums, counts = _cluster_sums(x, codes, k, chunk)
        centroids = sums / counts.clamp_min(1.0).unsqueeze(1)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):  # re-seed empty clusters at the worst-served points
            centroids[empty] = x[dist.topk(len(empty)).indices]
        new_codes, dist = assign_nearest(x, centroids, chunk)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    return centroids


def sample_rows(n: int, k: int, generator: torch.Generator) -> Tensor:
    """Indices of at most K x POINTS_PER_CODE rows (all rows, in order, when N is smaller)."""
    limit = k * POINTS_PER_CODE
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def residual_kmeans(z: Tensor, levels: int, k: int, iters: int, generator: torch.Generator,
                    chunk: int | None = None) -> list[Tensor]:
    """Codebooks fitted level by level on the residuals of the previous levels: L tensors (K, d)."""
    residual = z
    books = []
    for level in range(levels):
        centroids = kmeans(residual, k, iters, generator, chunk)
        codes, dist = assign_nearest(residual, centroids, chunk)
        log.debug("k-means level %d: mean squared residual %.4g", level + 1, float(dist.mean()))
        residual = residual - centroids[codes]  # (N, d)
        books.append(centroids)
    return books


@dataclass
class RQKMeansConfig:
    input_dim: int  # D
    levels: int = 4  # L
    codebook_size: int = 256  # K

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RQKMeans(nn.Module):
    """Residual k-means on the raw embeddings: the quantizer alone, with identity encoder and decoder.

    k-means is translation-invariant, so no centering is stored: the checkpoint holds only codebooks.
    """

    def __init__(self, config: RQKMeansConfig) -> None:
        super().__init__()
        self.config = config
        self.quantizer = ResidualQuantizer(config.levels, config.codebook_size, config.input_dim)

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    def encode(self, x: Tensor) -> Tensor:
        return x  # (B, D)

    def decode(self, quantized: Tensor) -> Tensor:
        return quantized  # (B, D): the sum of the chosen code vectors

    def soft_assignments(self, x: Tensor) -> Tensor:
        """(B, D) -> (B, L, K), differentiable w.r.t. the codebooks."""
        return self.quantizer(x).probs

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        return self.quantizer.assign(x)[0]  # (B, L)

    @torch.no_grad()
    def fit(self, x: Tensor, iters: int, generator: torch.Generator, chunk: int | None = None) -> RQKMeans:
        """Fit the codebooks on (a sample of at most K x 256 of) the items."""
        rows = sample_rows(x.shape[0], self.config.codebook_size, generator)
        sample = x[rows.to(x.device)]
        books = residual_kmeans(sample, self.config.levels, self.config.codebook_size, iters, generator, chunk)
        for param, book in zip(self.quantizer.codebooks, books):
            param.copy_(book)
        return self
