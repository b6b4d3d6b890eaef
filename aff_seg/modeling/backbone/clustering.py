"""Balanced clustering along a space-filling curve, and the cluster neighbourhoods.

As in the paper (AutoFocusFormer, CVPR 2023: the zig-zag scan-line curve with
anchors; a token's neighbourhood = the members of its nearest clusters) and the original
repository (apple/ml-autofocusformer-segmentation), with the conventions of
docs/reproducibility.md: every sort is stable and the ranking key is computed in float32 exactly
as the original computes it. See docs/aff.md.

Differences from the original, each a fix of a crash or a hazard:

* the anchor grid has at least one row and one column (the original rounds to 0 rows on very
  elongated canvases), and one or two anchors work (the original needs three);
* ``max_ratio`` in the ranking key is taken over the whole batch tensor, as the original does
  (docs/reproducibility.md).  It only spaces the cells apart, so the order inside a cell does not
  depend on it except through float32 rounding of the key (tested: an image gives the same
  tokens alone and inside a batch).
"""
import math

import torch

import clusten

__all__ = ["anchor_grid", "space_filling_cluster", "cluster_neighbourhoods"]


def anchor_grid(n, cluster_size, h, w):
    """The anchor cells of the scan-line curve for ``n`` tokens on an ``h x w`` canvas.

    Returns:
        ``(rows, cols, cell_h, cell_w)``: about ``ceil(n / cluster_size)`` cells of
        ``cell_h x cell_w`` grid units, at least one row and one column.
    """
    k = math.ceil(n / cluster_size)
    patch_len = (h * w / k) ** 0.5
    rows = max(1, int(round(h / patch_len)))
    cols = max(1, int(round(w / patch_len)))
    return rows, cols, h / rows, w / cols


def _scan_rank(cell_x, cell_y, cols):
    """Rank of a cell along the zig-zag curve: rows top to bottom, even rows left to right.

    Equal to the original's stable sort of the key ``cy * w + cx`` (even rows) /
    ``cy * w + (w - 1) - cx`` (odd rows), since ``cols <= w``.
    """
    odd = cell_y % 2 == 1
    return cell_y * cols + torch.where(odd, cols - 1 - cell_x, cell_x)


def space_filling_cluster(pos, cluster_size, h, w):
    """Order tokens along the anchor curve and cut the order into clusters of equal size.

    Tokens are assigned to anchor cells; cells are visited in scan-line order; inside a cell
    tokens go from the side of the previous anchor to the side of the next one (key
    ``rank * (max_ratio + 1) + |p - prev|^2 / (|p - next|^2 + 1e-5)``, stable sort, ties to the
    lower token index). Consecutive chunks of ``cluster_size`` tokens of that order are the
    clusters; the last one is short when ``cluster_size`` does not divide n.

    Args:
        pos: ``b x n x 2`` token positions (x, y) in stride-4 grid units, inside ``[0,w) x [0,h)``.
        cluster_size: m, tokens per cluster.
        h, w: the stride-4 canvas size.
    Returns:
        order: ``b x n`` int64, ``order[b, r]`` = index of the token ranked r.
        pos_sorted: ``b x n x 2`` float32, the positions in that order.
        cluster_mean: ``b x k x 2`` float32, mean position of each cluster (k = ceil(n/m)).
    """
    with torch.no_grad():
        pos = pos.detach().float()
        b, n, _ = pos.shape
        rows, cols, cell_h, cell_w = anchor_grid(n, cluster_size, h, w)
        cell_size = torch.tensor([cell_w, cell_h], dtype=torch.float32, device=pos.device)

        # anchor centres in curve order, float32 arithmetic as in the original
        cy = torch.arange(rows, device=pos.device).repeat_interleave(cols)
        cx = torch.arange(cols, device=pos.device).repeat(rows)
        curve = torch.empty(rows * cols, 2, dtype=torch.long, device=pos.device)
        curve[_scan_rank(cx, cy, cols)] = torch.stack([cx, cy], dim=1)
        anchors = curve * cell_size + cell_size / 2 - 0.5  # a x 2
        if len(anchors) > 1:
            before = anchors[:1] - (anchors[1:2] - anchors[:1])
            after = anchors[-1:] + (anchors[-1:] - anchors[-2:-1])
        else:  # a single anchor: order its tokens along the scan direction
            step = torch.stack([cell_size[0], cell_size.new_zeros(())]).unsqueeze(0)
            before, after = anchors - step, anchors + step
        prev_anchor = torch.cat([before, anchors[:-1]])
        next_anchor = torch.cat([anchors[1:], after])

        cell = (pos / cell_size).floor().long()  # b x n x 2
        rank = _scan_rank(cell[..., 0].clamp(0, cols - 1), cell[..., 1].clamp(0, rows - 1), cols)
        dist_prev = (pos - prev_anchor[rank]).pow(2).sum(-1)  # b x n
        dist_next = (pos - next_anchor[rank]).pow(2).sum(-1)
        ratio = dist_prev / (dist_next + 1e-5)
        key = rank * (ratio.amax() + 1) + ratio
        order = torch.sort(key, dim=1, stable=True)[1]  # b x n

        pos_sorted = pos.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
        k = math.ceil(n / cluster_size)
        if k * cluster_size == n:
            cluster_mean = pos_sorted.reshape(b, k, cluster_size, 2).mean(2)
        else:
            padded = pos_sorted.new_zeros(b, k * cluster_size, 2)
            padded[:, :n] = pos_sorted
            count = torch.full((k, 1), cluster_size, dtype=torch.long, device=pos.device)
            count[-1] = n - (k - 1) * cluster_size
            cluster_mean = padded.reshape(b, k, cluster_size, 2).sum(2) / count
    return order, pos_sorted, cluster_mean


def cluster_neighbourhoods(pos, cluster_mean, cluster_size, num_clusters):
    """Each token's neighbourhood: the members of its ``num_clusters`` nearest clusters.

    Tokens must be in cluster order (cluster j = tokens ``j*m .. j*m+m-1``). Clusters are
    ranked by the distance from the token to their mean (ties to the lower cluster index).

    Args:
        pos: ``b x n x 2`` clustered positions; cluster_mean: ``b x k x 2``.
        cluster_size: m; num_clusters: nnc <= k.
    Returns:
        nbhd_idx: ``b x n x (nnc*m)`` int64, cluster by cluster, nearest first; the padding
            slots of a short last cluster point to token 0.
        nbhd_valid: ``b x n x (nnc*m)`` bool (False on padding slots), or None without padding.
    """
    n = pos.shape[1]
    nearest = clusten.knn(pos, cluster_mean, num_clusters)  # b x n x nnc
    members = torch.arange(cluster_size, device=pos.device)
    nbhd_idx = (nearest.unsqueeze(-1) * cluster_size + members).flatten(2)
    if cluster_mean.shape[1] * cluster_size == n:
        return nbhd_idx, None
    nbhd_valid = nbhd_idx < n
    return nbhd_idx.masked_fill(~nbhd_valid, 0), nbhd_valid
