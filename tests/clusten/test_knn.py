"""clusten.knn against brute force, including exact ties (lower database index first)."""

import pytest
import torch

import clusten
from clusten import knn_search


def brute_force(query, database, k):
    """Stable full sort of float64 squared distances, one query at a time."""
    b, n, _ = query.shape
    idx = torch.empty(b, n, k, dtype=torch.int64)
    dist = torch.empty(b, n, k, dtype=torch.float32)
    for bi in range(b):
        for i in range(n):
            sq = ((database[bi].double() - query[bi, i].double()) ** 2).sum(-1)
            order = torch.sort(sq, stable=True).indices[:k]
            idx[bi, i] = order
            dist[bi, i] = sq[order].sqrt().float()
    return idx, dist


@pytest.mark.parametrize("k", [1, 4, 9])
def test_random_points_match_brute_force(k):
    g = torch.Generator().manual_seed(0)
    query, database = torch.rand(2, 30, 2, generator=g) * 50, torch.rand(2, 20, 2, generator=g) * 50
    idx, dist = clusten.knn(query, database, k, return_dist=True)
    ref_idx, ref_dist = brute_force(query, database, k)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist)


def test_grid_ties_go_to_lower_index():
    # Integer grid positions: most distances tie; the database is shuffled so index order
    # differs from position order.
    g = torch.Generator().manual_seed(1)
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(1, 36, 2)
    database = grid[:, torch.randperm(36, generator=g)]
    query = torch.cat([grid, grid + 0.5], 1)
    for k in (2, 4, 5, 9):
        idx = clusten.knn(query, database, k)
        assert torch.equal(idx, brute_force(query, database, k)[0])


def test_duplicate_database_points():
    database = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]])
    query = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]])
    idx = clusten.knn(query, database, 3)
    assert idx.tolist() == [[[1, 3, 0], [0, 2, 4], [0, 1, 2]]]


def test_chunking_gives_same_result(monkeypatch):
    g = torch.Generator().manual_seed(2)
    query, database = torch.randint(0, 8, (2, 40, 2), generator=g).float(), torch.randint(0, 8, (2, 25, 2), generator=g).float()
    whole = clusten.knn(query, database, 6, return_dist=True)
    monkeypatch.setattr(knn_search, "CHUNK_PAIRS_CPU", 60)  # one query per chunk
    chunked = clusten.knn(query, database, 6, return_dist=True)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_no_gradient_and_half_positions():
    query = (torch.rand(1, 10, 2) * 10).requires_grad_()
    database = torch.rand(1, 12, 2) * 10
    idx, dist = clusten.knn(query.half(), database.half(), 3, return_dist=True)
    assert not dist.requires_grad
    assert torch.equal(idx, brute_force(query.detach().half().float(), database.half().float(), 3)[0])


def test_bad_k_is_named():
    with pytest.raises(ValueError, match="k must be"):
        clusten.knn(torch.rand(1, 4, 2), torch.rand(1, 3, 2), 4)


def test_large_2d_searches_go_to_the_grid_search_with_identical_results(monkeypatch):
    calls = []
    real_grid = knn_search.grid_knn

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(knn_search, "grid_knn", spy)
    monkeypatch.setitem(knn_search.SEARCH_COST, "cpu", {"pair": 1.0, "query": 50.0, "call": 1000.0})
    g = torch.Generator().manual_seed(3)
    database = torch.randint(0, 40, (2, 300, 2), generator=g).float()
    query = torch.randint(-5, 45, (2, 200, 2), generator=g).float()
    idx, dist = clusten.knn(query, database, 4, return_dist=True)
    assert calls, "knn did not use the grid search where its cost is lower"
    ref_idx, ref_dist = clusten.brute_force_knn(query, database, 4, return_dist=True)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    assert clusten.knn(query[:, :5], database[:, :10], 4).shape == (2, 5, 4)  # small: brute force
    assert len(calls) == 1
    with clusten.knn_method("brute_force"):
        assert torch.equal(clusten.knn(query, database, 4), ref_idx)
    assert len(calls) == 1 and clusten.get_knn_method() == "auto"
    with pytest.raises(ValueError, match="CLUSTEN_KNN='grid': expected one of auto, brute_force"):
        knn_search.METHOD.validated("grid", knn_search.SEARCH_ENV)


def test_search_choice_follows_the_measured_cpu_cost():
    cpu = torch.device("cpu")
    # few queries over many points: the grid; many queries over few points: brute force
    assert knn_search.grid_search_pays(256, 16384, cpu)
    assert not knn_search.grid_search_pays(16384, 256, cpu)
    assert knn_search.grid_search_pays(16384, 1024, cpu)
    assert not knn_search.grid_search_pays(4, 4096, cpu)  # tiny: the grid's fixed cost dominates
    # a device without measured costs keeps the pair threshold
    meta = torch.device("meta")
    assert knn_search.grid_search_pays(4096, 4096, meta) and not knn_search.grid_search_pays(256, 16384, meta)


def permuted_grid(h, w, batch, generator):
    """Every pixel (x, y) of an h x w grid, each image in its own random order: ``batch x (h*w) x 2``."""
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 2)
    return torch.stack([grid[torch.randperm(h * w, generator=generator)] for _ in range(batch)])


@pytest.mark.parametrize("h,w", [(7, 7), (8, 13), (16, 9), (5, 9)])
def test_pixel_grid_search_matches_brute_force(h, w):
    # the database order decides the many ties; queries on pixels, on half pixels, anywhere
    # in the grid and on its corners; (5, 9) is below the window: brute force
    g = torch.Generator().manual_seed(4)
    pixels = permuted_grid(h, w, 2, g)
    scale = torch.tensor([w - 1.0, h - 1.0])
    corners = torch.tensor([[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0]]).expand(2, -1, -1)
    for query in (pixels, (torch.rand(2, 200, 2, generator=g) * scale * 2).round() / 2,
                  torch.rand(2, 200, 2, generator=g) * scale, corners):
        for k in (1, 2, 4, 5, 9):
            idx, dist = knn_search.pixel_grid_knn(query, pixels, (h, w), k, return_dist=True)
            ref_idx, ref_dist = clusten.brute_force_knn(query, pixels, k, return_dist=True)
            assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


def test_pixel_grid_search_names_its_premises():
    pixels = permuted_grid(8, 8, 1, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="within the 8 x 8 grid"):
        knn_search.pixel_grid_knn(torch.tensor([[[-0.5, 3.0]]]), pixels, (8, 8), 4)
    with pytest.raises(ValueError, match="every pixel of the 8 x 8 grid once"):
        knn_search.pixel_grid_knn(pixels, torch.cat([pixels[:, :1], pixels[:, :-1]], 1), (8, 8), 4)
    with pytest.raises(ValueError, match="k <= 9"):
        knn_search.pixel_grid_knn(pixels, pixels, (8, 8), 10)
