"""Balanced space-filling-curve clustering and cluster neighbourhoods."""
import math

import pytest
import torch

import aff_seg  # noqa: F401
from aff_seg.modeling.backbone.clustering import anchor_grid, cluster_neighbourhoods, space_filling_cluster
from aff_seg.modeling.backbone.merging import merge_count


def original_ranking(pos, m, h, w):
    """The original algorithm for one image, transcribed step by step from the original repository
    (apple/ml-autofocusformer-segmentation), with the ranking sorted stably (docs/reproducibility.md)."""
    pos = pos.float()
    n = pos.shape[1]
    k = math.ceil(n / m)
    patch_len = (h * w / k) ** 0.5
    nph, npw = int(round(h / patch_len)), int(round(w / patch_len))
    plh, plw = h / nph, w / npw
    ys, xs = torch.meshgrid(torch.arange(nph), torch.arange(npw), indexing="ij")
    key = torch.where(ys % 2 == 0, ys * w + xs, ys * w + (w - 1) - xs).reshape(-1)
    order_idx = key.sort(stable=True)[1]
    rank_of_cell = torch.empty_like(order_idx)
    rank_of_cell[order_idx] = torch.arange(len(order_idx))
    grid = torch.stack([xs, ys], -1).reshape(-1, 2)[order_idx]
    plen = torch.tensor([plw, plh])
    means = grid * plen + plen / 2 - 0.5
    prev = torch.cat([means[:1] - (means[1:2] - means[:1]), means[:-1]])
    nxt = torch.cat([means[1:], means[-1:] + (means[-1:] - means[-2:-1])])
    cell = (pos / plen).floor()
    r = rank_of_cell[(cell[..., 0] + cell[..., 1] * npw).long()]  # 1 x n
    ratio = (pos - prev[r]).pow(2).sum(-1) / ((pos - nxt[r]).pow(2).sum(-1) + 1e-5)
    return (r * (ratio.max() + 1) + ratio).sort(dim=1, stable=True)[1]


@pytest.mark.parametrize("h,w,m", [(16, 16, 8), (17, 23, 8), (32, 24, 24), (13, 9, 5)])
def test_grid_ranking_matches_the_original_algorithm(h, w, m):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([xs, ys], -1).reshape(1, -1, 2).float()
    order, pos_sorted, means = space_filling_cluster(pos, m, h, w)
    assert torch.equal(order, original_ranking(pos, m, h, w))
    assert torch.equal(pos_sorted, pos[0, order[0]].unsqueeze(0))
    k = math.ceil(h * w / m)
    assert means.shape == (1, k, 2)


def test_irregular_tokens_match_the_original_and_clusters_are_balanced():
    g = torch.Generator().manual_seed(0)
    h, w = 40, 30
    pos = torch.randperm(h * w, generator=g)[:333]
    pos = torch.stack([pos % w, pos // w], -1).float().unsqueeze(0)
    order, pos_sorted, means = space_filling_cluster(pos, 8, h, w)
    assert torch.equal(order, original_ranking(pos, 8, h, w))
    assert torch.equal(order.sort(dim=1)[0], torch.arange(333).unsqueeze(0))  # a permutation
    # cluster means: 41 full clusters of 8 and a last one of 5
    chunks = list(pos_sorted[0].split(8))
    assert [len(c) for c in chunks] == [8] * 41 + [5]
    assert torch.allclose(means[0], torch.stack([c.mean(0) for c in chunks]))


def test_each_image_is_clustered_independently_of_the_batch():
    g = torch.Generator().manual_seed(1)
    h, w = 24, 24
    pos = torch.stack([torch.randperm(h * w, generator=g)[:100] for _ in range(3)])
    pos = torch.stack([pos % w, pos // w], -1).float()
    order, _, _ = space_filling_cluster(pos, 8, h, w)
    for i in range(3):
        assert torch.equal(order[i], space_filling_cluster(pos[i:i + 1], 8, h, w)[0][0])


@pytest.mark.parametrize("n,m,h,w", [(64, 8, 2, 512), (16, 8, 1, 4096), (8, 8, 4, 4), (10, 5, 40, 1)])
def test_degenerate_anchor_grids_work(n, m, h, w):
    """Very elongated canvases (0 anchor rows in the original) and 1-2 anchors (< 3 crashes there)."""
    rows, cols, _, _ = anchor_grid(n, m, h, w)
    assert rows >= 1 and cols >= 1
    g = torch.Generator().manual_seed(2)
    flat = torch.randperm(h * w, generator=g)[:n]
    pos = torch.stack([flat % w, flat // w], -1).float().unsqueeze(0)
    order, pos_sorted, means = space_filling_cluster(pos, m, h, w)
    assert torch.equal(order.sort(dim=1)[0], torch.arange(n).unsqueeze(0))
    assert torch.isfinite(means).all()


def test_neighbourhoods_are_the_nearest_clusters_with_padding_masked():
    n, m = 21, 4  # 6 clusters, the last has 1 member and 3 padding slots
    pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], -1).float().unsqueeze(0)
    means = torch.stack([pos[0, i:i + m].mean(0) for i in range(0, n, m)]).unsqueeze(0)
    idx, valid = cluster_neighbourhoods(pos, means, m, 2)
    assert idx.shape == (1, n, 8) and valid.shape == (1, n, 8)
    # token 0: clusters 0 then 1
    assert idx[0, 0].tolist() == list(range(8))
    # token 20 (last cluster): itself + padding first, then cluster 4
    assert idx[0, 20].tolist() == [20, 0, 0, 0, 16, 17, 18, 19]
    assert valid[0, 20].tolist() == [True, False, False, False, True, True, True, True]
    assert (~valid).sum() == 3 * (idx == 20).sum()  # 3 padding slots wherever the last cluster is used


def test_anchor_grid_tensor_arithmetic_equals_the_float_formula():
    """The anchor grid is computed in float64 tensors (exportable with symbolic sizes); it must
    equal the original's Python-float formula."""
    for h in range(1, 70, 3):
        for w in range(1, 90, 7):
            for m in (4, 8, 24):
                n = h * w
                k = -(-n // m)
                patch_len = (h * w / k) ** 0.5
                rows, cols = max(1, int(round(h / patch_len))), max(1, int(round(w / patch_len)))
                got = anchor_grid(n, m, h, w)
                assert (int(got[0]), int(got[1])) == (rows, cols), (n, m, h, w)
                assert (float(got[2]), float(got[3])) == (h / rows, w / cols), (n, m, h, w)


def test_merge_count_equals_int_of_n_times_rate():
    for rate in (0.25, 0.2):
        for n in range(1, 300_000, 7):
            assert merge_count(n, rate, 0) == max(int(n * rate), 1), (n, rate)
