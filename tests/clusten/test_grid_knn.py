"""clusten.grid_knn (cell-bucketed KNN) must return exactly what the brute-force clusten.brute_force_knn returns."""
import pytest
import torch

from clusten import grid_knn
from clusten import brute_force_knn as knn


def _lattice(width, height):
    """All integer positions of a width x height canvas, row-major, ``(w*h) x 2`` float32."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2).float()


def _subset(points, count, generator):
    return points[torch.randperm(points.shape[0], generator=generator)[:count]]


def _assert_same(query, database, k):
    ref_idx, ref_dist = knn(query, database, k, return_dist=True)
    idx, dist = grid_knn(query, database, k, return_dist=True)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    assert torch.equal(dist, ref_dist)
    assert torch.equal(grid_knn(query, database, k), ref_idx)


@pytest.mark.parametrize("seed", range(6))
def test_sparse_grid_subsets_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    width, height = torch.randint(4, 36, (2,), generator=g).tolist()
    grid = _lattice(width, height)
    fraction = [1.0, 0.5, 0.25, 0.0625, 0.02, 0.3][seed]
    count = max(9, int(grid.shape[0] * fraction))
    database = torch.stack([_subset(grid, count, g) for _ in range(2)])
    query = torch.stack([_subset(grid, grid.shape[0], g) for _ in range(2)])
    for k in (1, 2, 4, 6, 9):
        _assert_same(query, database, k)


def test_tokens_to_tokens_on_a_downsampled_set():
    # Stage-like token set: a reserved coarse grid plus a dense patch (uneven density).
    g = torch.Generator().manual_seed(1)
    grid = _lattice(64, 40)
    coarse = grid[(grid[:, 0] % 8 == 0) & (grid[:, 1] % 8 == 0)]
    dense = grid[(grid[:, 0] < 20) & (grid[:, 1] < 12)]
    tokens = torch.cat([coarse, _subset(dense, 150, g)]).unique(dim=0)
    tokens = tokens[torch.randperm(tokens.shape[0], generator=g)].unsqueeze(0)
    for k in (2, 9):
        _assert_same(tokens, tokens, k)
    _assert_same(grid.unsqueeze(0), tokens, 4)  # every grid pixel -> level tokens


def test_tokens_to_cluster_means():
    # Non-integer database: means of chunks of 8 tokens of a shuffled canvas.
    g = torch.Generator().manual_seed(2)
    tokens = _subset(_lattice(30, 22), 30 * 22, g)
    means = tokens[:656].view(-1, 8, 2).mean(1)  # 82 clusters of 8
    _assert_same(tokens.unsqueeze(0), means.unsqueeze(0), 6)


def test_ties_and_duplicates_go_to_the_lower_index():
    grid = _lattice(12, 9)
    # Every database point appears three times; queries at half-integer points have 4 equidistant lattice points.
    database = torch.cat([grid, grid.flip(0), grid]).unsqueeze(0)
    query = (_lattice(11, 8) + 0.5).unsqueeze(0)
    for k in (2, 4, 6, 9):
        _assert_same(query, database, k)
    idx = grid_knn(query, database, 4)
    assert torch.equal(idx[0, :, 0], (idx[0, :, 0] % grid.shape[0]))  # a duplicate's first copy wins


def test_k_larger_than_the_points_in_nearby_cells():
    # A few database points far from most queries: the search must widen until it has k.
    database = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [90.0, 90.0], [91.0, 89.0],
                              [45.0, 2.0], [3.0, 70.0], [60.0, 61.0], [88.0, 3.0], [2.0, 2.0]]])
    query = _lattice(100, 100)[::7].unsqueeze(0)
    for k in (4, 9, 10):
        _assert_same(query, database, k)


def test_tiny_databases_and_far_queries():
    query = torch.tensor([[[-50.0, -50.0], [0.0, 0.0], [3.5, 1.0], [1e4, -3e3], [2.0, 2.0]]])
    _assert_same(query, torch.tensor([[[2.0, 2.0]]]), 1)
    _assert_same(query, torch.tensor([[[2.0, 2.0], [2.0, 2.0]]]), 2)
    _assert_same(query, torch.tensor([[[5.0, 1.0], [-3.0, 4.0], [0.0, 7.0]]]), 3)


def test_random_float_positions():
    g = torch.Generator().manual_seed(3)
    query = torch.rand(2, 300, 2, generator=g) * torch.tensor([37.0, 11.0])
    database = torch.rand(2, 90, 2, generator=g) * torch.tensor([37.0, 11.0])
    for k in (1, 6, 9):
        _assert_same(query, database, k)


def test_bad_arguments_are_named():
    points = torch.zeros(1, 5, 2)
    with pytest.raises(ValueError, match="k must be"):
        grid_knn(points, points, 6)
    with pytest.raises(ValueError, match="2-D"):
        grid_knn(torch.zeros(1, 5, 3), torch.zeros(1, 5, 3), 2)
    with pytest.raises(ValueError, match="database"):
        grid_knn(points, torch.zeros(2, 5, 2), 2)
