"""Sine position encodings: of token positions (point-cloud heads) and of a map's pixel grid (grid heads)."""
import math

import torch
from torch import nn

__all__ = ["PointPositionEmbeddingSine", "PositionEmbeddingSine"]


class PointPositionEmbeddingSine(nn.Module):
    """DETR's sine encoding, for points instead of a grid (docs/aff.md).

    Each coordinate is divided by its maximum over the image's points (``+1e-6``) and scaled by
    ``2*pi``; with ``w_j = temperature^(-2j/num_pos_feats)``, ``j < num_pos_feats/2``, a point
    gets ``[sin(x w_j), cos(x w_j), sin(y w_j), cos(y w_j)]`` (x first, sines then cosines).
    Upstream's grid version puts y first, interleaves sin/cos and normalises per image: the
    checkpoints were trained with this one.  The original divides by the maximum over the whole
    batch instead, the same for a batch of one image (evaluation, the Predictor); per image, an
    image's encoding does not depend on the images it is batched with, so that a batch split over
    processes trains as the whole batch in one process.
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
            angle = coord / (coord.amax(dim=-1, keepdim=True) + 1e-6) * self.scale  # b x n
            angle = angle.unsqueeze(-1) / dim_t  # b x n x half
            parts += [angle.sin(), angle.cos()]
        return torch.cat(parts, dim=-1)

    def extra_repr(self):
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, scale={self.scale:.4f}"


class PositionEmbeddingSine(nn.Module):
    """DETR's sine encoding of a feature map's pixel grid (upstream Mask2Former's, for the grid
    pixel decoder and decoder).

    Rows and columns are numbered 1..h and 1..w; with ``normalize`` they are divided by h (w)
    ``+1e-6`` and scaled by ``scale``.  With ``w_j = temperature^(-2 floor(j/2) / num_pos_feats)``,
    ``j < num_pos_feats``, channel j of each half is ``sin(coord w_j)`` for even j and
    ``cos(coord w_j)`` for odd j; the y half comes first.
    """

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: a scale needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask=None):
        """x: ``b x c x h x w`` (only its shape and device are used); mask: ``b x h x w`` bool,
        True on padding (None: no padding) -> ``b x 2*num_pos_feats x h x w`` float32."""
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * self.scale
        j = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(j, 2, rounding_mode="floor") / self.num_pos_feats)
        parts = []
        for embed in (y_embed, x_embed):
            angle = embed[..., None] / dim_t  # b x h x w x num_pos_feats
            parts.append(torch.stack((angle[..., 0::2].sin(), angle[..., 1::2].cos()), dim=4).flatten(3))
        return torch.cat(parts, dim=3).permute(0, 3, 1, 2)

    def extra_repr(self):
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale:.4f}")
