"""k-means: clusters recovered, determinism, chunking, degenerate inputs, residual k-means tokenizer."""

from __future__ import annotations

import pytest
import torch

from bloger_cli.errors import DataError
from bloger_cli.tokenizer.kmeans import RQKMeans, RQKMeansConfig, assign_nearest, kmeans, residual_kmeans, sample_rows

CENTERS = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])


def blobs(per: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CENTERS)).repeat_interleave(per)
    return CENTERS[labels] + 0.1 * torch.randn(len(labels), 2, generator=g), labels


def test_well_separated_clusters_are_recovered():
    x, labels = blobs()
    centroids = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(1))
    codes, _ = assign_nearest(x, centroids)
    # one centroid per true cluster, each cluster mapped to a single code
    assert all(len(codes[labels == c].unique()) == 1 for c in range(4))
    assert len(codes.unique()) == 4
    for c in range(4):
        torch.testing.assert_close(centroids[codes[labels == c][0]], x[labels == c].mean(0))


def test_kmeans_is_deterministic_given_the_generator():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 8, 10, torch.Generator().manual_seed(5))
    b = kmeans(x, 8, 10, torch.Generator().manual_seed(5))
    c = kmeans(x, 8, 10, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_chunked_assignment_equals_one_chunk():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    centroids = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    codes, dist = assign_nearest(x, centroids, chunk=50)
    codes3, dist3 = assign_nearest(x, centroids, chunk=3)
    assert torch.equal(codes, codes3)
    torch.testing.assert_close(dist, dist3)
    assert torch.equal(codes, torch.cdist(x, centroids).argmin(1))


def test_chunked_kmeans_equals_one_chunk():
    x, _ = blobs(per=8)
    a = kmeans(x, 4, 10, torch.Generator().manual_seed(3), chunk=5)
    b = kmeans(x, 4, 10, torch.Generator().manual_seed(3), chunk=1000)
    torch.testing.assert_close(a, b)


def test_fewer_items_than_codes_is_a_data_error():
    with pytest.raises(DataError) as err:
        kmeans(torch.randn(3, 2), 4, 10, torch.Generator())
    assert str(err.value) == "k-means cannot initialise 4 codes from 3 items; lower --codebook-size to at most 3"


def test_duplicated_points_do_not_break_seeding_or_updates():
    x = torch.cat([torch.zeros(10, 2), torch.ones(1, 2)])
    centroids = kmeans(x, 3, 5, torch.Generator().manual_seed(0))
    assert torch.isfinite(centroids).all()
    codes, dist = assign_nearest(x, centroids)
    assert float(dist.max()) == 0.0


def test_sample_rows_caps_the_fitting_set():
    assert torch.equal(sample_rows(10, 4, torch.Generator()), torch.arange(10))
    rows = sample_rows(5000, 4, torch.Generator().manual_seed(0))  # at most 4 x 256
    assert len(rows) == 1024 and len(rows.unique()) == 1024 and bool((rows[1:] > rows[:-1]).all())


def test_residual_kmeans_lowers_the_error_level_by_level():
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    books = residual_kmeans(x, 3, 8, 20, torch.Generator().manual_seed(0))
    assert [tuple(b.shape) for b in books] == [(8, 4)] * 3
    model = RQKMeans(RQKMeansConfig(input_dim=4, levels=3, codebook_size=8))
    model.fit(x, 20, torch.Generator().manual_seed(0))
    q = model.quantizer(x)
    errors = (q.residuals - q.chosen).pow(2).sum(2).mean(0)  # (L,) after each level
    assert bool((errors[1:] < errors[:-1]).all())
    assert torch.equal(model.codes(x), q.codes)
    torch.testing.assert_close(model.soft_assignments(x).sum(2), torch.ones(256, 3))
