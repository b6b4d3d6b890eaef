"""The CPU kernels of the gather primitives (sparse-matrix products) against the reference."""
import pytest
import torch

import clusten
from clusten import cpu, reference

# (groups, batch, queries, neighbours, rows per query, table rows, channels)
# (the neighbour counts 5, 3, 12 run gather_sum's row-sum kernel, 20 the sparse-matrix product)
SHAPES = [(8, 2, 37, 5, 1, 41, 7), (2, 1, 10, 3, 4, 9, 5), (4, 4, 6, 12, 1, 3, 2), (2, 1, 5, 0, 1, 4, 2),
          (4, 2, 11, 20, 2, 30, 6)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _inputs(g, b, n, m, r, n_src, c, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_src, (b, n, m), generator=gen)
    if m > 1:
        idx[..., 1] = idx[..., 0]  # duplicate neighbours (padding slots repeat token 0)
    w = torch.randn(g, n, m, r, generator=gen).to(dtype)
    x = torch.randn(g, n, r, c, generator=gen).to(dtype)
    y = torch.randn(g, n_src, c, generator=gen).to(dtype)
    return w, x, y, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernels_match_reference(shape, dtype):
    w, x, y, idx = _inputs(*shape, dtype)
    for got, want in [(cpu.gather_sum(w, y, idx), reference.gather_sum(w, y, idx)),
                      (cpu.gather_dot(x, y, idx), reference.gather_dot(x, y, idx))]:
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_chunks_give_the_same_result(monkeypatch):
    w, x, y, idx = _inputs(3, 1, 50, 6, 2, 20, 4, torch.float64)
    whole = cpu.gather_sum(w, y, idx), cpu.gather_dot(x, y, idx)
    monkeypatch.setattr(cpu, "CHUNK_ENTRIES", 1)  # one query per chunk
    for got, want in zip((cpu.gather_sum(w, y, idx), cpu.gather_dot(x, y, idx)), whole):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ops_use_them_on_cpu_and_the_torch_backend_the_reference(monkeypatch):
    w, _, y, idx = _inputs(2, 2, 9, 4, 1, 7, 3, torch.float32)
    calls = []
    monkeypatch.setattr(cpu, "gather_sum", lambda *a: calls.append("cpu") or reference.gather_sum(*a))
    torch.ops.clusten.gather_sum(w, y, idx)
    with clusten.backend("torch"):
        torch.ops.clusten.gather_sum(w, y, idx)
    assert calls == ["cpu"]


def test_gradcheck_through_the_cpu_kernels():
    w, x, y, idx = _inputs(2, 1, 4, 3, 2, 5, 3, torch.float64)
    for op, a in ((torch.ops.clusten.gather_sum, w), (torch.ops.clusten.gather_dot, x)):
        a, b = a.clone().requires_grad_(), y.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda p, q: op(p, q, idx), (a, b))


def test_autocast_region_keeps_the_accumulation_dtype():
    w, x, y, idx = _inputs(2, 1, 6, 3, 1, 5, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpu.gather_sum(w, y, idx), cpu.gather_dot(x, y, idx)
    for a, b in zip(got, (reference.gather_sum(w, y, idx), reference.gather_dot(x, y, idx))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL[torch.float32])
