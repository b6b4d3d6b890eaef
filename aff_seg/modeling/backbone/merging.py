"""Adaptive downsampling: choose the merge centres, then merge their neighbourhoods by PointConv.

As in the paper (AutoFocusFormer, CVPR 2023: adaptive downsampling) and the original repository
(apple/ml-autofocusformer-segmentation), with the selection rule of docs/reproducibility.md
(stable descending sort of the score instead of ``topk(sorted=False)``); see docs/aff.md.
"""
from fractions import Fraction

import torch

import clusten
from ..point_utils import PointConv, gather_points

__all__ = ["ClusterMerging", "merge_count", "reserve_count"]

RESERVE_PENALTY = -100.0  # subtracted from reserved tokens' score, so none is sampled twice


def merge_count(n, ds_rate, reserve_num):
    """Tokens after downsampling: ``int(n * ds_rate)``, but never fewer than the reserved grid
    (or 1), so that tiny inputs keep every reserved token.

    ``int(n * ds_rate)`` is computed as ``n * p // q`` with ``p / q`` the simplest fraction
    equal to ``ds_rate`` up to float64 rounding (1/4, 1/5: the same for every n checked, up to 3e6), so
    that a symbolic n (``torch.export``) gives a plain integer expression.
    """
    ratio = Fraction(ds_rate).limit_denominator(1 << 10)
    return max(n * ratio.numerator // ratio.denominator, reserve_num, 1)


class ClusterMerging(PointConv):
    """Keep ``n' = int(n * ds_rate)`` tokens and merge each one's attention neighbourhood.

    Score ``s = g + alpha * sigma`` (grid prior g, importance sigma detached); tokens on the
    coarse reserved grid (x, y multiples of 2*stride) are always kept. New token list: the
    ``n' - reserve_num`` best-scored others (descending score, ties to the lower index), then
    the reserved ones in ascending index. Each keeps its position and merges its neighbourhood
    by PointConv whose weights are multiplied by the neighbours' (non-detached) importance:
    the only path by which ``prob_net`` learns.

    Parameters (checkpoint names, from ``PointConv``): ``weight_net``, ``norm``, ``linear``.
    """

    def __init__(self, dim, out_dim, alpha=4.0, ds_rate=0.25, reserve_on=True):
        super().__init__(dim, out_dim, inner_ch=4)
        self.alpha = alpha
        self.ds_rate = ds_rate
        self.reserve_on = reserve_on

    def select(self, pos, importance, stride, reserve_num):
        """Indices of the kept tokens.

        Args:
            pos: ``b x n x 2`` positions; importance: ``b x n x 1`` in (0, 1).
            stride: 2, 4, 8 for stages 1-3; reserve_num: number of reserved-grid tokens.
        Returns:
            ``b x n'`` int64.
        """
        b, n, _ = pos.shape
        reserve_num = reserve_num if self.reserve_on else 0
        keep = merge_count(n, self.ds_rate, reserve_num)
        pos_long = pos.long()
        if stride == 2:  # stage 1 is still the full grid
            grid = (pos_long % 2 == 0).all(-1)
        else:  # a grid twice as coarse as the local spacing
            _, dist = clusten.knn(pos, pos, 2, return_dist=True)
            # distinct grid positions are >= 1 apart; the clamp keeps duplicates off a 0 stride
            ada_stride = (2 ** (dist[..., 1].clamp(min=1).log2().ceil() + 1)).long()  # b x n
            grid = (pos_long % ada_stride.unsqueeze(-1) == 0).all(-1)
        # a NaN importance (from a diverging run or overflowing input) ranks last, never first,
        # so that reserved tokens are not sampled a second time
        importance = torch.nan_to_num(importance.detach().reshape(b, n).float(), nan=0.0)
        score = grid.float() + importance * self.alpha
        if not self.reserve_on:
            return torch.sort(score, dim=1, descending=True, stable=True)[1][:, :keep]
        reserved = (pos_long % (2 * stride) == 0).all(-1)
        score = score + reserved.float() * RESERVE_PENALTY
        sampled = torch.sort(score, dim=1, descending=True, stable=True)[1][:, : keep - reserve_num]
        reserved_idx = torch.sort(reserved.byte(), dim=1, descending=True, stable=True)[1][:, :reserve_num]
        return torch.cat([sampled, reserved_idx], dim=1)

    def forward(self, pos, feat, nbhd_idx, nbhd_valid, importance, stride, reserve_num):
        """
        Args:
            pos: ``b x n x 2``; feat: ``b x n x C``.
            nbhd_idx: ``b x n x M`` attention neighbourhoods, or None for global attention
                (every token's neighbourhood is all n tokens).
            nbhd_valid: ``b x n x M`` bool or None.
            importance: ``b x n x 1`` sigmoid(prob_net(feat)), not detached.
            stride, reserve_num: as in ``select``.
        Returns:
            pos ``b x n' x 2`` and feat ``b x n' x C_out`` of the kept tokens.
        """
        b, n, _ = pos.shape
        idx = self.select(pos, importance, stride, reserve_num)  # b x n'
        keep = idx.shape[1]
        new_pos = pos.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
        if nbhd_idx is None:
            merge_idx = torch.arange(n, device=pos.device).expand(b, keep, n)
            modulation = gather_points(importance, merge_idx)
        else:
            m = nbhd_idx.shape[-1]
            merge_idx = nbhd_idx.gather(1, idx.unsqueeze(-1).expand(-1, -1, m))
            modulation = gather_points(importance, merge_idx)  # b x n' x M x 1
            if nbhd_valid is not None:
                valid = nbhd_valid.gather(1, idx.unsqueeze(-1).expand(-1, -1, m))
                modulation = modulation * valid.unsqueeze(-1).to(modulation.dtype)
        offset = gather_points(pos, merge_idx) - new_pos.unsqueeze(2)  # neighbour - centre
        return new_pos, super().forward(feat, merge_idx, offset, modulation)

    def extra_repr(self):
        return f"alpha={self.alpha}, ds_rate={self.ds_rate}, reserve_on={self.reserve_on}"


def reserve_count(h, w, stride):
    """Tokens of the ``h x w`` canvas on the reserved grid (x, y multiples of 2*stride)."""
    # ceil division without negative operands: the ONNX export turns a symbolic floor division
    # into a truncating Div, so that -(-h // s) would round down there
    s = 2 * stride
    return (h + s - 1) // s * ((w + s - 1) // s)
