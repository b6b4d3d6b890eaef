"""Point helpers shared by the backbone and the heads (one place for each).

Tokens are points: a feature ``b x n x c`` plus a position ``b x n x 2`` holding (x, y) in
units of the stride-4 grid (reference, coordinate convention).  This module holds what every
part of the model does with positions:

* ``relative_position_features``: the 5 features of a neighbour-query offset that the
  relative-position bias and the PointConv weights are linear functions of;
* ``PointConv``: PointConv merging (backbone adaptive downsampling, pixel-decoder layer_1);
* ``shepard_weights`` / ``shepard_interpolate``: inverse-distance (Shepard) interpolation;
* ``points_to_canvas``: scatter token values onto the dense stride-4 canvas;
* ``over_token_chunks``: token-wise work a chunk of tokens at a time in inference (bounded memory).
"""
import contextlib

import torch
from torch import nn

import clusten

__all__ = [
    "relative_position_features",
    "PointConv",
    "shepard_weights",
    "shepard_neighbours",
    "shepard_interpolate",
    "points_to_canvas",
    "gather_points",
    "autocast_off",
    "grid_positions",
    "inference_chunks",
    "over_token_chunks",
]

def grid_positions(h, w, batch, device):
    """All (x, y) of the ``h x w`` stride-4 grid in row-major order: ``batch x (h*w) x 2`` float32."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).expand(batch, -1, -1)


SHEPARD_EPS = 1e-11
# without autograd, token-wise work runs on at most this many tokens at a time, so that its
# temporaries stay bounded for large images (4096 x 4096: a million stride-4 tokens; e.g. the
# ``n x inner_ch x c`` PointConv intermediate of the pixel decoder would be 4 GB, and the
# deformable encoder's sampling indices and weights take over 10 kB per query). 2^14: the
# stride-4 tokens of a 512 x 512 image run in one piece.
INFERENCE_CHUNK = 1 << 14


def inference_chunks(n):
    """Slices covering ``range(n)``: chunks of ``INFERENCE_CHUNK`` tokens when autograd is off and
    ``n`` is a plain int above it; otherwise one slice (training, and the symbolic sizes of
    ``torch.export``, whose graph then holds no size-dependent loop)."""
    if torch.is_grad_enabled() or not isinstance(n, int) or n <= INFERENCE_CHUNK:
        return [slice(0, n)]
    return [slice(s, min(s + INFERENCE_CHUNK, n)) for s in range(0, n, INFERENCE_CHUNK)]


def over_token_chunks(fn, n, *tensors):
    """``fn(*tensors)`` for a function that works token by token along dim 1, run on the
    ``inference_chunks(n)`` of the tokens and written into one output.

    Args:
        fn: takes the tensors (``b x n x ...`` each, or None, passed through) and returns a
            ``b x n x ...`` tensor whose row i depends on the tensors' rows i only.
        n: the number of tokens (dim 1 of every tensor and of the output).
    Returns:
        ``fn``'s output; equal to ``fn(*tensors)`` (the same row-wise arithmetic).
    """
    chunks = inference_chunks(n)
    if len(chunks) == 1:
        return fn(*tensors)
    out = None
    for part in chunks:
        result = fn(*(None if t is None else t[:, part] for t in tensors))
        if out is None:
            out = result.new_empty(result.shape[0], n, *result.shape[2:])
        out[:, part] = result
    return out


def relative_position_features(offset):
    """Features ``[dx, dy, dist, dy/dist, dx/dist]`` of integer offsets.

    The original evaluates these on a fixed table of offsets in [-511, 511]^2 (inputs up to
    2048 px) and clamps larger offsets; here they are computed for the offsets actually used,
    exactly, for any size: identical to the table inside its range.

    Args:
        offset: ``... x 2`` (dx, dy), any float or integer dtype.
    Returns:
        ``... x 5`` float32; the (0, 0) offset gives all zeros (the original zeroes its NaNs).
    """
    offset = offset.float()
    dx, dy = offset[..., 0], offset[..., 1]
    dist = torch.sqrt(dx * dx + dy * dy)
    safe = torch.where(dist > 0, dist, torch.ones_like(dist))
    zero = torch.zeros_like(dist)
    return torch.stack(
        [dx, dy, dist, torch.where(dist > 0, dy / safe, zero), torch.where(dist > 0, dx / safe, zero)],
        dim=-1,
    )


class PointConv(nn.Module):
    """PointConv over irregular neighbourhoods (AFF's merging and its decoder's ``layer_1``).

    For each output token i with neighbourhood ``nbhd_idx[b, i, :]`` (M source tokens):
    ``W = weight_net(features(offset))`` (``b x n x M x inner_ch``), optionally multiplied by a
    per-neighbour modulation, then ``F[b,i,ic,c] = sum_j W[b,i,j,ic] * feat[b, idx[b,i,j], c]``
    (clusten_wf), flattened ic-major to ``b x n x (inner_ch*c)``, ``norm`` (LayerNorm) and
    ``linear``.  Submodule names match the official checkpoints.
    """

    def __init__(self, in_dim, out_dim, inner_ch=4, bias=True):
        super().__init__()
        self.inner_ch = inner_ch
        self.weight_net = nn.Sequential(nn.Linear(5, inner_ch), nn.LayerNorm(inner_ch), nn.GELU())
        self.norm = nn.LayerNorm(inner_ch * in_dim)
        self.linear = nn.Linear(inner_ch * in_dim, out_dim, bias=bias)

    def forward(self, feat, nbhd_idx, offset, modulation=None):
        """
        Args:
            feat: ``b x n_ x c`` source token features.
            nbhd_idx: ``b x n x M`` indices into the source tokens.
            offset: ``b x n x M x 2`` position offsets (the caller chooses the sign convention:
                neighbour - centre in the backbone, centre - neighbour in the pixel decoder).
            modulation: optional ``b x n x M x 1`` factor on the weights (importance x mask).
        Returns:
            ``b x n x out_dim``.
        """
        return over_token_chunks(lambda *rows: self._merge(feat, *rows), nbhd_idx.shape[1], nbhd_idx, offset,
                                 modulation)

    def _merge(self, feat, nbhd_idx, offset, modulation):
        weights = self.weight_net(relative_position_features(offset).to(self.weight_net[0].weight.dtype))
        if modulation is not None:
            weights = weights * modulation
        merged = clusten.clusten_wf(weights, feat, nbhd_idx)  # b x n x inner_ch x c
        merged = merged.flatten(2)  # ic-major: index ic * c + c'
        return self.linear(self.norm(merged))


def shepard_weights(dist2, power, eps=SHEPARD_EPS, valid=None):
    """Normalised Shepard weights ``u_q / sum u`` with ``u_q = 1 / ((d_q^2)^power + eps)``.

    Args:
        dist2: ``... x k`` squared distances.
        power: float or tensor broadcastable to ``dist2`` (the exponent on the *squared*
            distance, so ``power=3`` means weights ~ d^-6).
        valid: ``... x k`` bool or None; False slots get ``u = 0`` (weight 0).
    Returns:
        ``... x k`` weights summing to 1 over the last dim.
    """
    u = 1.0 / (dist2.pow(power) + eps)
    if valid is not None:
        u = torch.where(valid, u, 0.0)
    return u / u.sum(dim=-1, keepdim=True)


def shepard_neighbours(query_pos, source_pos, k=4, power=3.0, nn_idx=None, grid_hw=None):
    """The k source tokens nearest to each query position and their Shepard weights.

    Depends on positions only, so a caller that interpolates several features between the same
    two point sets computes it once (one neighbour search) and reuses it.

    Args:
        query_pos: ``b x n x 2``; source_pos: ``b x n_ x 2``.
        k: neighbours (at most n_); power: Shepard power on the squared distance.
        nn_idx: ``b x n x k`` the neighbours if already known (no search then).
        grid_hw: (h, w) when the sources are every pixel of an h x w grid (``clusten.knn``).
    Returns:
        ``(nn_idx b x n x k int64, weights b x n x k float32)``.
    """
    if nn_idx is None:
        nn_idx = clusten.knn(query_pos, source_pos, min(k, source_pos.shape[1]), grid_hw=grid_hw)
    nbr_pos = gather_points(source_pos.float(), nn_idx)
    dist2 = (nbr_pos - query_pos.float().unsqueeze(2)).pow(2).sum(-1)
    return nn_idx, shepard_weights(dist2, power)


def shepard_interpolate(source_feat, neighbours):
    """Interpolate token features at other positions from their nearest tokens.

    Args:
        source_feat: ``b x n_ x c``.
        neighbours: ``(nn_idx, weights)`` of :func:`shepard_neighbours`, both ``b x n x k``.
    Returns:
        ``b x n x c``; a query that coincides with a source token copies it (weight ~1/eps).
    """
    nn_idx, weights = neighbours
    return clusten.weighted_gather(nn_idx, weights.to(source_feat.dtype), source_feat)


def gather_points(points, idx):
    """``points`` b x n_ x d gathered by ``idx`` b x n x k -> b x n x k x d."""
    b, n, k = idx.shape
    flat = idx.reshape(b, n * k, 1).expand(-1, -1, points.shape[-1])
    return torch.gather(points, 1, flat).reshape(b, n, k, points.shape[-1])


def points_to_canvas(values, pos, h, w):
    """Scatter token values onto the dense stride-4 canvas.

    Args:
        values: ``b x n x c``; pos: ``b x n x 2`` integer (x, y) positions, all inside
            ``[0, w) x [0, h)``; for the res2 tokens (all h*w grid points) every pixel is set.
    Returns:
        ``b x c x h x w``, contiguous (a channels-last canvas would make the later resize and
        class-weighted sum copy it with a transpose); pixels without a token are 0.
    """
    b, n, c = values.shape
    flat = (pos[..., 1].long() * w + pos[..., 0].long()).clamp_(0, h * w - 1)  # b x n
    canvas = values.new_zeros(b, c, h * w)
    canvas.scatter_(2, flat.unsqueeze(1).expand(-1, c, -1), values.transpose(1, 2))
    return canvas.view(b, c, h, w)


def autocast_off(device_type):
    """A region computed in the inputs' dtypes: disables autocast if it is on, else does nothing
    (so that an exported inference graph holds no autocast region)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
