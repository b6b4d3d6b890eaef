"""clusten.ms_deform_attn against a per-point Python loop; gradients; dtypes; bad input."""
import math

import pytest
import torch

import clusten
from clusten.ms_deform_attn import ms_deform_attn_flop

SHAPES = [(3, 4), (2, 3)]  # two levels
B, Q, HEADS, D, POINTS = 2, 3, 2, 3, 2


def inputs(dtype=torch.float64, seed=0, margin=0.2):
    """Random value / locations (some outside [0, 1], to exercise the zero padding) / weights."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, s, HEADS, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, HEADS, len(SHAPES), POINTS, 2, generator=g, dtype=torch.float64) * (1 + 2 * margin) - margin
    weights = torch.rand(B, Q, HEADS, len(SHAPES), POINTS, generator=g, dtype=torch.float64)
    return value.to(dtype), loc.to(dtype), weights.to(dtype)


def naive(value, loc, weights):
    """Bilinear interpolation written out per (image, query, head, level, point)."""
    out = torch.zeros(B, Q, HEADS * D, dtype=torch.float64)
    starts = [0]
    for h, w in SHAPES:
        starts.append(starts[-1] + h * w)
    for b in range(B):
        for i in range(Q):
            for m in range(HEADS):
                acc = torch.zeros(D, dtype=torch.float64)
                for lvl, (h, w) in enumerate(SHAPES):
                    for p in range(POINTS):
                        x = loc[b, i, m, lvl, p, 0].item() * w - 0.5  # pixel centres on integers
                        y = loc[b, i, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(D, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    sample += wy * wx * value[b, starts[lvl] + yy * w + xx, m].double()
                        acc += weights[b, i, m, lvl, p].item() * sample
                out[b, i, m * D:(m + 1) * D] = acc
    return out


def test_matches_the_per_point_loop():
    value, loc, weights = inputs()
    out = clusten.ms_deform_attn(value, SHAPES, loc, weights)
    assert out.shape == (B, Q, HEADS * D) and out.dtype == torch.float64
    torch.testing.assert_close(out, naive(value, loc, weights), rtol=1e-12, atol=1e-12)
    # the shapes may also come as a levels x 2 tensor (upstream's form)
    torch.testing.assert_close(clusten.ms_deform_attn(value, torch.tensor(SHAPES), loc, weights), out)


def test_gradcheck_float64():
    value, loc, weights = inputs(margin=0.0)
    args = [t.requires_grad_(True) for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(lambda v, l, a: clusten.ms_deform_attn(v, SHAPES, l, a), args)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_samples_in_float32(dtype, tol):
    """Low-precision inputs give the float64 result of those (rounded) inputs to the output's
    precision: the locations are not rounded further, as sampling runs in float32."""
    value, loc, weights = inputs(dtype)
    out = clusten.ms_deform_attn(value, SHAPES, loc, weights)
    assert out.dtype == dtype
    exact = clusten.ms_deform_attn(value.double(), SHAPES, loc.double(), weights.double())
    err = (out.double() - exact).abs().max().item() / exact.abs().max().item()
    assert err < tol
    v, l, a = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    clusten.ms_deform_attn(v, SHAPES, l, a).float().sum().backward()
    assert v.grad.dtype == l.grad.dtype == a.grad.dtype == dtype


def test_flop_count():
    value, loc, _ = inputs()
    assert ms_deform_attn_flop(value.shape, loc.shape) == 5 * B * Q * HEADS * len(SHAPES) * POINTS * D


def test_bad_input_names_the_argument():
    value, loc, weights = inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        clusten.ms_deform_attn(value, [(3, 4), (2, 2)], loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        clusten.ms_deform_attn(value, SHAPES, loc, weights[:, :, :1])
    with pytest.raises(ValueError, match="levels"):
        clusten.ms_deform_attn(value, SHAPES[:1], loc, weights)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
def test_cuda_matches_cpu(dtype, tol):
    value, loc, weights = inputs(dtype)
    args = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    cuda_args = [t.detach().cuda().requires_grad_(True) for t in args]
    out = clusten.ms_deform_attn(args[0], SHAPES, args[1], args[2])
    out_cuda = clusten.ms_deform_attn(cuda_args[0], SHAPES, cuda_args[1], cuda_args[2])
    torch.testing.assert_close(out_cuda.cpu(), out, rtol=tol, atol=tol)
    out.float().sum().backward()
    out_cuda.float().sum().backward()
    for cpu, gpu in zip(args, cuda_args):
        torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, rtol=tol, atol=tol)
