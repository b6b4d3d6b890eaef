"""Sine position encoding of token positions (shared by the pixel decoder and the decoder)."""
import math

import torch
from torch import nn

__all__ = ["PointPositionEmbeddingSine"]


class PointPositionEmbeddingSine(nn.Module):
    """DETR's sine encoding, for points instead of a grid (reference section 5).

    Each coordinate is divided by its maximum over the whole batch (``+1e-6``) and scaled by
    ``2*pi``; with ``w_j = temperature^(-2j/num_pos_feats)``, ``j < num_pos_feats/2``, a point
    gets ``[sin(x w_j), cos(x w_j), sin(y w_j), cos(y w_j)]`` (x first, sines then cosines).
    Upstream's grid version puts y first, interleaves sin/cos and normalises per image: the
    checkpoints were trained with this one.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, scale=2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, pos):
        """pos: ``b x n x 2`` (x, y) -> ``b x n x 2*num_pos_feats`` float32."""
        pos = pos.float()
        half = self.num_pos_feats // 2
        j = torch.arange(half, dtype=torch.float32, device=pos.device)
        dim_t = self.temperature ** (2.0 * j / self.num_pos_feats)  # half
        parts = []
        for coord in (pos[..., 0], pos[..., 1]):
            angle = coord / (coord.max() + 1e-6) * self.scale
            angle = angle.unsqueeze(-1) / dim_t  # b x n x half
            parts += [angle.sin(), angle.cos()]
        return torch.cat(parts, dim=-1)

    def extra_repr(self):
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, scale={self.scale:.4f}"
