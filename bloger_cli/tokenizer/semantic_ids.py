"""Semantic IDs for a whole catalog: chunked assignment, collision handling (docs/design.md §1.6), statistics.

Everything here is vectorised over items: assignment loops over chunks of items (4,096 on the CPU,
65,536 on GPUs; one (chunk, K) distance matrix in memory at a time, never an (N, K, L) tensor), and
collisions are found by sorting (torch.unique), never by a Python loop over items.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from bloger_cli.errors import DataError
from bloger_cli.tokenizer.kmeans import chunk_rows
from bloger_cli.tokenizer.rqvae import ResidualQuantizer


class Tokenizer(Protocol):
    """What RQVAE and RQKMeans share: an encoder to the code space, the quantizer, a decoder back."""

    quantizer: ResidualQuantizer

    def encode(self, x: Tensor) -> Tensor: ...
    def decode(self, quantized: Tensor) -> Tensor: ...


class Assignment(NamedTuple):
    codes: Tensor  # (N, L) int64, on the CPU
    quantization_error: list[float]  # per level: mean over items of ||r_{l+1}||^2 after level l
    reconstruction_error: float  # mean (x - x_hat)^2 over items and coordinates


@torch.no_grad()
def assign_all(model: Tokenizer, x: Tensor, device: torch.device, chunk: int | None = None) -> Assignment:
    """Hard codes of every item, chunk by chunk, with the residual and reconstruction errors."""
    chunk = chunk or chunk_rows(device)
    was_training = getattr(model, "training", False)
    model.eval()  # type: ignore[attr-defined]
    n, levels = x.shape[0], model.quantizer.levels
    codes = torch.empty(n, levels, dtype=torch.int64)
    sq_residual = torch.zeros(levels, dtype=torch.float64)
    sq_recon = 0.0
    for start in range(0, n, chunk):
        xb = x[start:start + chunk].to(device)  # (B, D)
        chunk_codes, quantized, errors = model.quantizer.assign(model.encode(xb))  # (B, L), (B, d), (B, L)
        codes[start:start + chunk] = chunk_codes.cpu()
        sq_residual += errors.double().sum(dim=0).cpu()
        sq_recon += float((model.decode(quantized) - xb).pow(2).sum(dim=1).double().sum())
    model.train(was_training)  # type: ignore[attr-defined]
    n_safe = max(n, 1)
    return Assignment(codes, (sq_residual / n_safe).tolist(), sq_recon / (n_safe * x.shape[1]))


def prefix_groups(codes: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per level l: (group of each item's prefix c_1..c_l (N,), items per group (G,)).

    Group ids are dense and numbered in sorted prefix order, so each level's key stays below N x K
    whatever L and K are (no packing overflow).
    """
    out = []
    key = torch.zeros(codes.shape[0], dtype=torch.int64)
    for level in range(codes.shape[1]):
        key = key * (int(codes[:, level].max()) + 1 if len(codes) else 1) + codes[:, level]
        _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
        out.append((inverse, counts))
        key = inverse  # dense ids 0..G-1 for the next level
    return out


class CollisionReport(NamedTuple):
    collision_rate: float  # share of items whose L codes are shared with another item
    colliding_items: int
    largest_group: int  # items in the largest group sharing all L codes (1: no collisions)


def collision_report(groups: tuple[Tensor, Tensor]) -> CollisionReport:
    """From the full-code groups (the last entry of `prefix_groups`)."""
    inverse, counts = groups
    if len(inverse) == 0:
        return CollisionReport(0.0, 0, 0)
    colliding = int((counts[inverse] > 1).sum())
    return CollisionReport(colliding / len(inverse), colliding, int(counts.max()))


def _check_capacity(codes: Tensor, groups: tuple[Tensor, Tensor], capacity: int) -> None:
    """A group larger than `capacity` (the suffix level's K codes) cannot be made unique: a DataError."""
    inverse, counts = groups
    if len(counts) and int(counts.max()) > capacity:
        big = int(counts.argmax())
        example = codes[(inverse == big).nonzero()[0, 0]].tolist()
        raise DataError(
            f"{int(counts.max())} items share the semantic ID {tuple(example)}, more than the {capacity} "
            f"disambiguation codes",
            hint="raise --codebook-size or --levels so fewer items collide (an undertrained rqvae also "
                 "collides: try more --epochs)",
        )


def disambiguate(codes: Tensor, item_ids: Tensor, groups: tuple[Tensor, Tensor], capacity: int) -> Tensor:
    """Append a code 0, 1, 2, ... within each group of items sharing all L codes: (N, L) -> (N, L+1).

    Ranks follow item id within a group; singletons get 0. A group larger than `capacity` (the suffix
    level's K codes) cannot be made unique and is a DataError.
    """
    _check_capacity(codes, groups, capacity)
    inverse, counts = groups
    by_item = torch.argsort(item_ids, stable=True)
    order = by_item[torch.argsort(inverse[by_item], stable=True)]  # group-major, item id within a group
    starts = torch.cumsum(counts, dim=0) - counts  # (G,) first position of each group in `order`
    rank = torch.arange(len(order)) - starts[inverse[order]]
    suffix = torch.empty_like(rank)
    suffix[order] = rank
    return torch.cat([codes, suffix.unsqueeze(1)], dim=1)


def keep_suffixes(codes: Tensor, previous: Tensor, item_ids: Tensor, groups: tuple[Tensor, Tensor],
                  capacity: int) -> Tensor:
    """Disambiguation that moves as few IDs as it can: (N, L) new codes and the previous IDs (N, L+1) ->
    (N, L+1). An item whose L codes are unchanged keeps its suffix (such items shared their group
    before too, so their suffixes stay distinct); every other item takes, in item-id order, the smallest
    suffixes that its new group's kept items do not use. Vectorised over the groups that gain items.
    """
    _check_capacity(codes, groups, capacity)
    inverse, counts = groups
    keep = (codes == previous[:, :-1]).all(dim=1)  # (N,)
    suffix = torch.where(keep, previous[:, -1], -1)
    moved = (~keep).nonzero().squeeze(1)  # (M,)
    if len(moved) == 0:
        return torch.cat([codes, suffix.unsqueeze(1)], dim=1)
    touched, row = torch.unique(inverse[moved], return_inverse=True)  # (G,), (M,) group row of each mover
    width = min(capacity, int(counts.max()) + int(suffix.max().clamp_min(0)) + 1)
    used = torch.zeros(len(touched), width + 1, dtype=torch.bool)  # column `width` absorbs kept suffixes >= width
    kept = keep & torch.isin(inverse, touched)
    kept_row = torch.searchsorted(touched, inverse[kept])
    used[kept_row, suffix[kept].clamp_max(width)] = True
    free_rank = torch.cumsum(~used[:, :width], dim=1)  # (G, width) how many free suffixes up to each column
    order = torch.argsort(item_ids[moved], stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # movers group-major, item id within a group
    starts = torch.cumsum(torch.bincount(row, minlength=len(touched)), dim=0)
    rank = torch.arange(len(order)) - (starts - torch.bincount(row, minlength=len(touched)))[row[order]]
    # the (rank+1)-th free column of the mover's group: a group of at most `capacity` items always has one
    column = torch.searchsorted(free_rank[row[order]], (rank + 1).unsqueeze(1)).squeeze(1)
    suffix[moved[order]] = column
    return torch.cat([codes, suffix.unsqueeze(1)], dim=1)


def level_stats(codes: Tensor, groups: list[tuple[Tensor, Tensor]], codebook_size: int,
                quantization_error: list[float]) -> list[dict[str, Any]]:
    """Per level: codes used, density (used / K), entropy in bits, prefix collision rate, residual error."""
    rows = []
    n = max(codes.shape[0], 1)
    for level in range(codes.shape[1]):
        counts = torch.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0].double() / n
        inverse, group_sizes = groups[level]
        shared = int((group_sizes[inverse] > 1).sum())
        rows.append({
            "level": level + 1,
            "codes_used": int((counts > 0).sum()),
            "density": int((counts > 0).sum()) / codebook_size,
            "entropy_bits": float(-(p * torch.log2(p)).sum()) + 0.0,  # + 0.0 turns -0.0 into 0.0
            "collision_rate": shared / n,
            "quantization_error": float(quantization_error[level]),
        })
    return rows



class SemanticIDs(NamedTuple):
    codes: Tensor  # (N, L) or (N, L+1) with the disambiguation code, int64 on the CPU
    report: CollisionReport  # before disambiguation
    stats: list[dict[str, Any]]  # level_stats of the L tokenizer levels
    assignment: Assignment


def semantic_ids(model: Tokenizer, x: Tensor, item_ids: Tensor, codebook_size: int, device: torch.device,
                 disambiguated: bool = True, previous: Tensor | None = None) -> SemanticIDs:
    """Every item's semantic ID from the tokenizer (tokenize, and after each bi-level tokenizer update).

    previous: the IDs before a tokenizer update (N, L+1), rows in the order of `x`: an item whose L codes
    did not change keeps its disambiguation code (`keep_suffixes`), so only re-coded items get new IDs."""
    assignment = assign_all(model, x, device)
    groups = prefix_groups(assignment.codes)
    if not disambiguated:
        codes = assignment.codes
    elif previous is not None:
        codes = keep_suffixes(assignment.codes, previous.cpu(), item_ids, groups[-1], codebook_size)
    else:
        codes = disambiguate(assignment.codes, item_ids, groups[-1], codebook_size)
    stats = level_stats(assignment.codes, groups, codebook_size, assignment.quantization_error)
    return SemanticIDs(codes, collision_report(groups[-1]), stats, assignment)
