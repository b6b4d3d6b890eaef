"""Exact 2-D k-nearest neighbours by bucketing the database into square cells.

Same results as :func:`clusten.knn` (docs/reproducibility.md: float32 positions, squared
distances ``dx*dx + dy*dy`` in float64, ties to the lower database index, nearest first), found
by looking only at the cells around each query instead of the whole database.

Method. The database of each image is bucketed into a grid of square cells whose side is a
power of two, sized from the database density so that a 3 x 3 block of cells holds a few
times k points; points are sorted by (image, cell row, cell column, index), so the cells of
one block row are one contiguous range. A query first reads the (2r+1) x (2r+1) block of
cells around its own cell (r = 1). Its k best candidates are final when their k-th squared
distance is strictly below the squared distance from the query to the nearest side of the
block behind which further cells exist: every point outside the block is at least that far,
so it can neither beat nor tie the k-th candidate. Queries that fail this test search again
with r doubled, until the block covers the whole grid. Because the cell side is a power of
two, cell assignment and block sides are exact in float64, so the test is exact.

Which call sites it suits: exactness holds for any positions, so all six KNN uses of the model
qualify (tokens -> tokens with k = 2 or 9, grid pixels or res2 -> level tokens with k = 4, level
tokens -> res2 with k = 4, and tokens -> cluster means with k = nnc = 6, whose database is
non-integer). It pays off when the database is large (the brute force costs n x n_ distances, the grid
search a roughly fixed amount per query); :func:`clusten.knn` chooses by the measured costs of
each device (``clusten.knn_search.SEARCH_COST``). Strongly uneven densities (a dense cluster plus a few far points) make cells unbalanced
and the search slower, never wrong. The search synchronises with the host once per round.
"""
import math

import torch

from .validation import check

# query x candidate slots per chunk: about 200 MB of temporaries (1M grid pixels, k = 9, one thread:
# 1 << 23 took 0.9 GB and was no faster)
CANDIDATE_ELEMENTS = 1 << 20
POINTS_NEAR_QUERY = 1.5  # cell side ~ 1.5 x the radius expected to hold k database points


@torch.no_grad()
def grid_knn(query, database, k, return_dist=False):
    """The k nearest database points of every query point (2-D), via cell buckets.

    Args:
        query: ``b x n x 2`` positions.
        database: ``b x n_ x 2`` positions, same device.
        k: number of neighbours, ``1 <= k <= n_``.
        return_dist: also return the distances.
    Returns:
        ``b x n x k`` int64 database indices, nearest first (ties: lower index first), and, if
        ``return_dist``, the ``b x n x k`` float32 Euclidean distances.
    """
    s = check("grid_knn", [("query", query, "b n d", "float"), ("database", database, "b n_ d", "float")])
    if s["d"] != 2:
        raise ValueError(f"grid_knn: positions must be 2-D (d = 2), got d={s['d']}")
    if not isinstance(k, int) or not 1 <= k <= s["n_"]:
        raise ValueError(f"grid_knn: k must be an int in [1, n_={s['n_']}] (database size), got {k!r}")
    b, n = s["b"], s["n"]
    q = query.detach().float().double().reshape(b * n, 2)
    grid = _CellGrid(database.detach().float().double(), k)
    q_batch = torch.arange(b, device=q.device).repeat_interleave(n)
    idx = torch.empty(b * n, k, dtype=torch.int64, device=q.device)
    sq = torch.empty(b * n, k, dtype=torch.float64, device=q.device)
    pending = torch.arange(b * n, device=q.device)
    radius = 1
    while pending.numel():
        unresolved = []
        step = max(1, CANDIDATE_ELEMENTS // grid.candidate_bound(radius))
        for start in range(0, pending.numel(), step):
            part = pending[start:start + step]
            part_idx, part_sq, done = grid.search(q[part], q_batch[part], radius, k)
            idx[part[done]] = part_idx[done]
            sq[part[done]] = part_sq[done]
            unresolved.append(part[~done])
        pending = torch.cat(unresolved)
        radius *= 2
    idx = idx.view(b, n, k)
    return (idx, sq.sqrt().float().view(b, n, k)) if return_dist else idx


class _CellGrid:
    """The database of every image bucketed into square cells (side a power of two)."""

    def __init__(self, db, k):
        b, n_db, _ = db.shape
        low = db.reshape(-1, 2).amin(0).floor()
        span = (db.reshape(-1, 2).amax(0) - low).tolist()
        area = (span[0] + 1.0) * (span[1] + 1.0)  # +1: integer grids have no zero-width extent
        radius_k = math.sqrt(k * area / (math.pi * n_db))
        self.side = 2.0 ** round(math.log2(POINTS_NEAR_QUERY * radius_k))
        self.low = low
        self.cols = int(span[0] // self.side) + 1
        self.rows = int(span[1] // self.side) + 1
        cell = ((db - low) / self.side).floor().long()
        image = torch.arange(b, device=db.device).view(b, 1)
        flat = (image * self.rows + cell[..., 1]) * self.cols + cell[..., 0]
        order = torch.sort(flat.reshape(-1), stable=True).indices
        counts = torch.bincount(flat.reshape(-1), minlength=b * self.rows * self.cols)
        self.starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # cell t holds [starts[t], starts[t+1])
        self.max_count = int(counts.max())
        # database index and x, y of each sorted point, then a sentinel at infinity that the
        # unused candidate slots read (index n_db, squared distance inf)
        self.sentinel = order.numel()
        self.index = torch.cat([order % n_db, order.new_full((1,), n_db)])
        self.x, self.y = torch.cat([db.reshape(-1, 2).index_select(0, order), db.new_full((1, 2), math.inf)]).t()
        self.x, self.y = self.x.contiguous(), self.y.contiguous()
        self.n_db = n_db

    def candidate_bound(self, radius):
        """Most candidates one query can see in a block of radius ``radius``."""
        cells = min(2 * radius + 1, self.rows) * min(2 * radius + 1, self.cols)
        return max(1, min(cells * self.max_count, self.n_db))

    def search(self, q, q_batch, radius, k):
        """Best k of the (2r+1)^2 block around each query: (``nq x k`` indices, squared distances, final?)."""
        nq = q.shape[0]
        size = torch.tensor([self.cols, self.rows], device=q.device)
        cell = torch.minimum(((q - self.low) / self.side).floor().long().clamp(min=0), size - 1)
        first, last = cell - radius, cell + radius  # block corners in cells (may lie outside the grid)
        block_rows = first[:, 1:] + torch.arange(2 * radius + 1, device=q.device)
        row_ok = (block_rows >= 0) & (block_rows < self.rows)
        row_base = (q_batch[:, None] * self.rows + block_rows.clamp(0, self.rows - 1)) * self.cols
        begin = self.starts[row_base + first[:, :1].clamp(min=0)]
        end = self.starts[row_base + last[:, :1].clamp(max=self.cols - 1) + 1]
        length = torch.where(row_ok, end - begin, 0)
        width = max(1, int(length.max()))
        slot = torch.arange(width, device=q.device)
        real = slot < length[..., None]
        flat_slot = torch.where(real, begin[..., None] + slot, self.sentinel).view(-1)
        cand = self.index.index_select(0, flat_slot).view(nq, -1)
        dx = q[:, :1] - self.x.index_select(0, flat_slot).view(nq, -1)
        dy = q[:, 1:] - self.y.index_select(0, flat_slot).view(nq, -1)
        sq = dx * dx + dy * dy
        if cand.shape[1] < k:
            pad = k - cand.shape[1]
            cand = torch.cat([cand, cand.new_full((nq, pad), self.n_db)], 1)
            sq = torch.cat([sq, sq.new_full((nq, pad), math.inf)], 1)
        cand, sq = _k_smallest(cand, sq, k)
        # Distance from the query to the nearest block side with cells behind it.
        block_low = self.low + first * self.side
        block_high = self.low + (last + 1) * self.side
        gap_low = torch.where(first > 0, q - block_low, math.inf)
        gap_high = torch.where(last < size - 1, block_high - q, math.inf)
        margin = torch.minimum(gap_low, gap_high).amin(1)
        done = length.sum(1).ge(k) & (sq[:, k - 1] < margin * margin)
        return cand, sq, done


def _k_smallest(cand, sq, k):
    """The k best candidates of each row by (squared distance, database index), nearest first.

    ``cand`` (int64) and ``sq`` (float64) are ``nq x L``, ``L >= k``, with distinct indices per row
    (padding excepted). The rule is ``k_smallest``'s with the candidates in index order, without
    sorting them: a row with exactly k candidates at or below its k-th smallest distance takes
    those (topk's choice); the others take every candidate below it, then of those at exactly
    that distance the ones of lowest index, until there are k.
    """
    best_sq, best = sq.topk(k, dim=1, largest=False, sorted=True)
    kth = best_sq[:, -1:]
    tied_rows = ((sq <= kth).sum(1) > k).nonzero().squeeze(1)
    if tied_rows.numel():
        best[tied_rows] = _tie_rule(cand[tied_rows], sq[tied_rows], kth[tied_rows], k)
    cand, sq = cand.gather(1, best), sq.gather(1, best)
    cand, by_index = cand.sort(dim=1)  # then by distance, stable: ties in index order
    sq, by_sq = sq.gather(1, by_index).sort(dim=1, stable=True)
    return cand.gather(1, by_sq), sq


def _tie_rule(cand, sq, kth, k):
    """Slots of the k candidates of rows with more than k at or below their k-th distance ``kth``:
    all below it, then the tied ones of lowest index."""
    below = sq < kth
    tied = sq == kth
    room = k - below.sum(1, keepdim=True)  # 1..k tied candidates still to take
    tied_index = torch.where(tied, cand, torch.iinfo(cand.dtype).max)
    limit = tied_index.topk(k, dim=1, largest=False, sorted=True).values.gather(1, room - 1)
    take = below | (tied & (cand <= limit))  # exactly k per row
    slot = torch.arange(cand.shape[1], device=cand.device)
    return torch.where(take, slot, slot + cand.shape[1]).topk(k, dim=1, largest=False, sorted=False).indices
