"""Multi-scale deformable attention on dense feature maps (Deformable DETR, Zhu et al., ICLR 2021).

``ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)`` is the
sampling core of the grid pixel decoder: every query reads ``n_points`` bilinearly
interpolated values per head and level and mixes them with its attention weights.

The one implementation is PyTorch's ``grid_sample`` per level (as the original's CPU
reference), so it runs on every device.  Sampling and mixing always run in float32 (float64
stays float64): a bf16 sampling location on a 128-cell-wide map is off by up to half a cell.
The op is the ``torch.library`` custom op ``clusten::ms_deform_attn``, so a tracer sees one node
(``tools/analyze_model.py`` counts its FLOPs) and ``torch.compile`` treats it as opaque; its
gradients (value, sampling locations, attention weights) are those of the PyTorch composition.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import check

__all__ = ["ms_deform_attn", "ms_deform_attn_flop"]


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _sample_and_mix(value: Tensor, shapes: List[int], loc: Tensor, weights: Tensor) -> Tensor:
    """The PyTorch composition (see ``ms_deform_attn``), in ``value``'s dtype."""
    n, s, m, d = value.shape
    _, q, _, levels, points, _ = loc.shape
    dtype = _compute_dtype(value.dtype)
    hw = list(zip(shapes[0::2], shapes[1::2]))
    per_level = value.to(dtype).split([h * w for h, w in hw], dim=1)
    grid = 2.0 * loc.to(dtype) - 1.0  # [0, 1] -> grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(hw):
        # n x (h*w) x m x d -> (n*m) x d x h x w
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # n x q x m x points x 2 -> (n*m) x q x points x 2
        g = grid[:, :, :, lvl].transpose(1, 2).reshape(n * m, q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (n*m) x d x q x (levels*points), level-major like the weights
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    mix = weights.to(dtype).transpose(1, 2).reshape(n * m, 1, q, levels * points)
    out = (sampled * mix).sum(-1)  # (n*m) x d x q
    return out.view(n, m * d, q).transpose(1, 2).contiguous().to(value.dtype)


@torch.library.custom_op("clusten::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(value: Tensor, shapes: List[int], loc: Tensor, weights: Tensor) -> Tensor:
    return _sample_and_mix(value, shapes, loc, weights)


@_ms_deform_attn_op.register_fake
def _(value, shapes, loc, weights):
    n, _, m, d = value.shape
    return value.new_empty(n, loc.shape[1], m * d)


def _setup_context(ctx, inputs, output):
    value, shapes, loc, weights = inputs
    ctx.shapes = shapes
    ctx.save_for_backward(value, loc, weights)


def _backward(ctx, grad):
    value, loc, weights = ctx.saved_tensors
    inputs = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
    with torch.enable_grad():
        out = _sample_and_mix(inputs[0], ctx.shapes, inputs[1], inputs[2])
    grad_value, grad_loc, grad_weights = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return grad_value, None, grad_loc, grad_weights


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Multi-scale deformable attention (bilinear sampling, zeros outside the maps).

    out[b,i,h*d+c] = sum_{l,p} attention_weights[b,i,h,l,p] *
    bilinear(value of level l, head h, channel c)(sampling_locations[b,i,h,l,p]),
    with locations (x, y) in ``[0, 1]`` of each level's map (pixel centres at
    ``(j + 0.5) / w``, as ``grid_sample`` with ``align_corners=False``).

    Args:
        value: ``b x s x heads x d``, the levels' maps flattened row-major and concatenated
            (``s = sum_l h_l * w_l``).
        spatial_shapes: the levels' ``(h_l, w_l)``: a sequence of pairs or an
            ``levels x 2`` integer tensor.
        sampling_locations: ``b x q x heads x levels x points x 2``.
        attention_weights: ``b x q x heads x levels x points``.
    Returns:
        ``b x q x (heads*d)`` in value's dtype (computed in float32 at least).
    """
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    # symbolic sizes stay symbolic (int() would fix an exported graph to the example's size)
    shapes = [x if isinstance(x, torch.SymInt) else int(x) for hw in spatial_shapes for x in hw]
    s = check("ms_deform_attn", [
        ("value", value, "b s heads d", "float"),
        ("sampling_locations", sampling_locations, "b q heads levels points two", "float"),
        ("attention_weights", attention_weights, "b q heads levels points", "float"),
    ])
    if len(shapes) != 2 * s["levels"] or s["two"] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes has {len(shapes) // 2} levels and sampling_locations "
            f"{tuple(sampling_locations.shape)} has {s['levels']} levels x {s['two']} coordinates (expected 2)"
        )
    total = sum(h * w for h, w in zip(shapes[0::2], shapes[1::2]))
    if total != s["s"]:
        raise ValueError(
            f"ms_deform_attn: value has {s['s']} positions but spatial_shapes {spatial_shapes} cover {total}"
        )
    return _ms_deform_attn_op(value, shapes, sampling_locations, attention_weights)


def ms_deform_attn_flop(value_shape: Sequence[int], locations_shape: Sequence[int]) -> int:
    """Multiply-adds of ``ms_deform_attn``: 4 for the bilinear interpolation and 1 for the
    attention weight per (query, head, level, point, channel): ``5 * b * q * heads * levels *
    points * d`` with ``value`` ``b x s x heads x d`` and locations ``b x q x heads x levels x points x 2``."""
    b, q, heads, levels, points, _ = locations_shape
    return 5 * b * q * heads * levels * points * value_shape[-1]
