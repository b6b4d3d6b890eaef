"""CUDA kernels against the PyTorch twins (skipped without a CUDA device).

Tolerances (kernel vs twin; both accumulate in float32, so they differ by summation order and
by one rounding of the output): float32 rtol/atol 1e-5, float16 1e-2, bfloat16 3e-2 (relative
to the tensors' scale, see ``_close``).
"""
import pytest
import torch

import clusten
from clusten import backends, build
from .clusten_op_inputs import OPS, op_inputs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
SIZES = dict(B=2, H=2, N=300, N_SRC=257, M=16, C=32, IC=4, K=4)
TINY = dict(B=1, H=2, N=5, N_SRC=6, M=3, C=4, IC=2, K=2)
N_SRC = SIZES["N_SRC"]


@pytest.fixture(scope="module", autouse=True)
def extension():
    return build.load_extension()


def _inputs(op, dtype, seed=0, sizes=SIZES):
    return op_inputs(op, sizes, dtype, device="cuda", seed=seed)




def _run(op, args, backend, monkeypatch):
    """Forward output and gradients of every floating input, on the given backend."""
    monkeypatch.setattr(backends.BACKEND, "value", backend)
    args = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    out = getattr(clusten, op)(*args)
    grad_out = torch.randn_like(out, dtype=torch.float32, generator=torch.Generator(device="cuda").manual_seed(1))
    grads = torch.autograd.grad(out, [a for a in args if a.is_floating_point()], grad_out.to(out.dtype))
    return [out, *grads]


def _close(actual, expected, tol):
    scale = expected.float().abs().max().clamp_min(1)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("op", OPS)
def test_kernel_matches_twin(op, dtype, monkeypatch):
    args = _inputs(op, dtype)
    kernel = _run(op, args, "cuda", monkeypatch)
    twin = _run(op, args, "torch", monkeypatch)
    for a, b in zip(kernel, twin):
        assert a.dtype == dtype
        _close(a, b, TOLERANCE[dtype])


@pytest.mark.parametrize("op", OPS)
def test_kernel_gradcheck_float64(op, monkeypatch):
    monkeypatch.setattr(backends.BACKEND, "value", "cuda")
    args = _inputs(op, torch.float64, sizes=TINY)
    assert torch.autograd.gradcheck(getattr(clusten, op), args, nondet_tol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_deterministic_mode_repeats_bitwise(op, monkeypatch):
    args = _inputs(op, torch.float32)
    atomic = _run(op, args, "cuda", monkeypatch)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _run(op, args, "cuda", monkeypatch)
        second = _run(op, args, "cuda", monkeypatch)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        _close(a, c, 1e-5)


def test_int32_indices_and_beyond_original_grid_limit(monkeypatch):
    # The original's weighted_gather could not launch past ~262,140 tokens at 256 channels.
    monkeypatch.setattr(backends.BACKEND, "value", "cuda")
    n, n_src, c = 300_000, 75_000, 256
    feat = torch.randn(1, n_src, c, device="cuda")
    idx = torch.randint(0, n_src, (1, n, 4), device="cuda", dtype=torch.int32)
    weights = torch.rand(1, n, 4, device="cuda")
    out = clusten.weighted_gather(idx, weights, feat)
    expected = (weights[0, :, :, None] * feat[0][idx[0].long()]).sum(1)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_debug_mode_checks_index_range(monkeypatch):
    monkeypatch.setattr(backends.BACKEND, "value", "cuda")
    monkeypatch.setattr(backends, "debug", True)
    q, k, idx = _inputs("clusten_qk", torch.float32)
    idx[0, 0, 0] = N_SRC
    with pytest.raises(IndexError, match="nbhd_idx"):
        clusten.clusten_qk(q, k, idx)


def test_knn_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    query = torch.randint(0, 64, (2, 5000, 2), generator=g).float()
    database = torch.randint(0, 64, (2, 700, 2), generator=g).float()
    cpu_idx, cpu_dist = clusten.knn(query, database, 9, return_dist=True)
    gpu_idx, gpu_dist = clusten.knn(query.cuda(), database.cuda(), 9, return_dist=True)
    assert torch.equal(gpu_idx.cpu(), cpu_idx) and torch.equal(gpu_dist.cpu(), cpu_dist)


@pytest.mark.slow
def test_more_than_2_31_output_elements(monkeypatch):
    """64-bit indexing: an output of 2^31 + 2^24 elements (about 4.3 GB in float16)."""
    monkeypatch.setattr(backends.BACKEND, "value", "cuda")
    n, c = (1 << 23) + (1 << 16), 256
    feat = torch.randn(1, 1024, c, device="cuda", dtype=torch.float16)
    idx = torch.randint(0, 1024, (1, n, 2), device="cuda")
    weights = torch.rand(1, n, 2, device="cuda", dtype=torch.float16)
    out = clusten.weighted_gather(idx, weights, feat)
    for i in (0, n // 2, n - 1):
        expected = (weights[0, i, :, None].float() * feat[0, idx[0, i]].float()).sum(0)
        torch.testing.assert_close(out[0, i].float(), expected, rtol=1e-2, atol=1e-2)
