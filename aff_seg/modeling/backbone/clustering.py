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
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

import clusten

__all__ = ["anchor_grid", "space_filling_cluster", "cluster_neighbourhoods"]


def anchor_grid(n, cluster_size, h, w):
    """The anchor cells of the scan-line curve for ``n`` tokens on an ``h x w`` canvas.

    Computed in float64 tensors (not Python floats) so that the same arithmetic runs when the
    sizes are symbolic (``torch.export`` with a dynamic input size).

    Returns:
        ``(rows, cols, cell_h, cell_w)``: 0-dim tensors (int64, int64, float64, float64), about
        ``ceil(n / cluster_size)`` cells of ``cell_h x cell_w`` grid units, at least one row and
        one column.
    """
    k = (n + cluster_size - 1) // cluster_size
    hw = torch.stack([torch.scalar_tensor(h, dtype=torch.float64), torch.scalar_tensor(w, dtype=torch.float64)])
    patch_len = torch.sqrt(hw[0] * hw[1] / k)
    rows, cols = (hw / patch_len).round().clamp(min=1).unbind()  # round half to even, as Python's round
    return rows.long(), cols.long(), hw[0] / rows, hw[1] / cols


def _scan_rank(cell_x, cell_y, cols):
    """Rank of a cell along the zig-zag curve: rows top to bottom, even rows left to right.

    Equal to the original's stable sort of the key ``cy * w + cx`` (even rows) /
    ``cy * w + (w - 1) - cx`` (odd rows), since ``cols <= w``.
    """
    odd = cell_y % 2 == 1
    return cell_y * cols + torch.where(odd, cols - 1 - cell_x, cell_x)


def _anchor_at(rank, cols, cell_size):
    """Centre (x, y) of the anchor cell of curve rank ``rank`` (any shape, int64), float32."""
    cell_y = rank // cols
    cell_x = rank % cols
    cell_x = torch.where(cell_y % 2 == 1, cols - 1 - cell_x, cell_x)
    return torch.stack([cell_x, cell_y], dim=-1) * cell_size + cell_size / 2 - 0.5


def space_filling_cluster(pos, cluster_size, h, w):
    """Order tokens along the anchor curve and cut the order into clusters of equal size.

    Tokens are assigned to anchor cells; cells are visited in scan-line order; inside a cell
    tokens go from the side of the previous anchor to the side of the next one (key
    ``rank * (max_ratio + 1) + |p - prev|^2 / (|p - next|^2 + 1e-5)``, stable sort, ties to the
    lower token index). The curve is extended by one step before the first and after the last
    anchor (along the scan direction for a single anchor). Consecutive chunks of
    ``cluster_size`` tokens of that order are the clusters; the last one is short when
    ``cluster_size`` does not divide n.

    Each token's anchors are computed from its rank, without a table of all anchors, so the
    number of anchors never becomes a tensor size (exportable with a dynamic input size).

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
        cell_size = torch.stack([cell_w, cell_h]).float().to(pos.device)
        rows, cols = rows.to(pos.device), cols.to(pos.device)
        last = rows * cols - 1

        # the first two and last two anchors give the extension steps of the curve's ends
        ends = _anchor_at(torch.stack([last.new_zeros(()), last.clamp(max=1), last, (last - 1).clamp(min=0)]),
                          cols, cell_size)
        step = torch.stack([cell_size[0], cell_size.new_zeros(())])  # a single anchor: scan direction
        before = torch.where(last > 0, ends[0] - (ends[1] - ends[0]), ends[0] - step)
        after = torch.where(last > 0, ends[2] + (ends[2] - ends[3]), ends[2] + step)

        cell = (pos / cell_size).floor().long()  # b x n x 2
        rank = _scan_rank(cell[..., 0].clamp(min=0).minimum(cols - 1), cell[..., 1].clamp(min=0).minimum(rows - 1),
                          cols)
        prev_anchor = torch.where((rank == 0).unsqueeze(-1), before, _anchor_at((rank - 1).clamp(min=0), cols, cell_size))
        next_anchor = torch.where((rank == last).unsqueeze(-1), after, _anchor_at(rank.minimum(last - 1).clamp(min=0) + 1,
                                                                                   cols, cell_size))
        dist_prev = (pos - prev_anchor).pow(2).sum(-1)  # b x n
        dist_next = (pos - next_anchor).pow(2).sum(-1)
        ratio = dist_prev / (dist_next + 1e-5)
        key = rank * (ratio.amax() + 1) + ratio
        order = torch.sort(key, dim=1, stable=True)[1]  # b x n

        pos_sorted = pos.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
        k = (n + cluster_size - 1) // cluster_size
        pad = k * cluster_size - n  # slots missing from the last cluster
        padded = F.pad(pos_sorted, (0, 0, 0, pad))
        count = torch.full((k,), cluster_size, dtype=torch.long, device=pos.device)
        count = count - (torch.arange(k, device=pos.device) == k - 1).long() * pad
        cluster_mean = padded.reshape(b, k, cluster_size, 2).sum(2) / count.unsqueeze(-1)
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
        nbhd_valid: ``b x n x (nnc*m)`` bool (False on padding slots), or None when there is
            no padding (always a mask for symbolic sizes, where that is not known).
    """
    n = pos.shape[1]
    nearest = clusten.knn(pos, cluster_mean, num_clusters)  # b x n x nnc
    members = torch.arange(cluster_size, device=pos.device)
    nbhd_idx = (nearest.unsqueeze(-1) * cluster_size + members).flatten(2)
    whole = cluster_mean.shape[1] * cluster_size == n
    if isinstance(whole, torch.Tensor):  # torch.jit.trace (fvcore's FLOP count) traces sizes as tensors
        whole = bool(whole)
    if statically_known_true(whole):  # (symbolic sizes: keep the mask)
        return nbhd_idx, None
    nbhd_valid = nbhd_idx < n
    return nbhd_idx.masked_fill(~nbhd_valid, 0), nbhd_valid
