"""The public clusten ops against naive Python loops; gradients of the PyTorch twins."""
import pytest
import torch

import clusten
from clusten import reference
from .clusten_op_inputs import op_inputs

B, H, N, N_SRC, M, C, IC, K = 2, 3, 5, 6, 4, 3, 2, 3


def naive_qk(query, key, idx):
    b, h, n, _ = query.shape
    out = torch.zeros(b, h, n, idx.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                for j in range(idx.shape[-1]):
                    out[bi, hi, i, j] = sum(query[bi, hi, i, c].item() * key[bi, hi, idx[bi, i, j], c].item()
                                            for c in range(query.shape[-1]))
    return out


def naive_av(attn, value, idx):
    b, h, n, m = attn.shape
    out = torch.zeros(b, h, n, value.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                for j in range(m):
                    out[bi, hi, i] += attn[bi, hi, i, j].item() * value[bi, hi, idx[bi, i, j]].double()
    return out


def naive_wf(weights, feat, idx):
    b, n, m, ic = weights.shape
    out = torch.zeros(b, n, ic, feat.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for i in range(n):
            for j in range(m):
                for r in range(ic):
                    out[bi, i, r] += weights[bi, i, j, r].item() * feat[bi, idx[bi, i, j]].double()
    return out


def naive_weighted_gather(idx, weights, feat):
    b, n, k = idx.shape
    out = torch.zeros(b, n, feat.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for i in range(n):
            for q in range(k):
                out[bi, i] += weights[bi, i, q].item() * feat[bi, idx[bi, i, q]].double()
    return out


def naive_msdetrpc(nn_idx, nn_weight, attn, value):
    b, n, m, k = nn_idx.shape
    out = torch.zeros(b, n, value.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for i in range(n):
            for p in range(m):
                for q in range(k):
                    out[bi, i] += attn[bi, i, p].item() * nn_weight[bi, i, p, q].item() * value[bi, nn_idx[bi, i, p, q]].double()
    return out


SIZES = dict(B=B, H=H, N=N, N_SRC=N_SRC, M=M, C=C, IC=IC, K=K)


def make_inputs(op, dtype=torch.float64, index_dtype=torch.int64, seed=0):
    """Random arguments for ``op`` (floats require grad), in the op's argument order."""
    return op_inputs(op, SIZES, dtype, index_dtype, seed=seed)


NAIVE = {
    "clusten_qk": naive_qk,
    "clusten_av": naive_av,
    "clusten_wf": naive_wf,
    "weighted_gather": naive_weighted_gather,
    "msdetrpc": naive_msdetrpc,
}
OPS = sorted(NAIVE)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("op", OPS)
def test_matches_naive_loops(op, index_dtype):
    args = make_inputs(op, index_dtype=index_dtype)
    out = getattr(clusten, op)(*args)
    expected = NAIVE[op](*[a.detach() for a in args])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op):
    args = make_inputs(op)
    assert torch.autograd.gradcheck(getattr(clusten, op), args)


@pytest.mark.parametrize("op", ["clusten_qk", "msdetrpc"])
def test_gradgradcheck(op):
    args = make_inputs(op)
    assert torch.autograd.gradgradcheck(getattr(clusten, op), args)


@pytest.mark.parametrize("op", OPS)
def test_index_inputs_get_no_gradient(op):
    args = make_inputs(op)
    getattr(clusten, op)(*args).sum().backward()
    for a in args:
        if a.is_floating_point():
            assert a.grad is not None and a.grad.abs().sum() > 0
        else:
            assert a.grad is None


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_matches_float64(op, dtype, tol):
    args64 = make_inputs(op)
    args = [a.detach().to(dtype).requires_grad_() if a.is_floating_point() else a for a in args64]
    out = getattr(clusten, op)(*args)
    assert out.dtype == dtype
    out64 = getattr(clusten, op)(*args64)
    torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol)
    out.double().square().sum().backward()
    out64.square().sum().backward()
    for a, a64 in zip(args, args64):
        if a.is_floating_point():
            assert a.grad.dtype == dtype
            torch.testing.assert_close(a.grad.double(), a64.grad, rtol=4 * tol, atol=4 * tol)


def test_original_dtype_casts():
    q, k, idx = make_inputs("clusten_qk", dtype=torch.float32)
    assert clusten.clusten_qk(q, k.detach().double(), idx).dtype == torch.float32
    attn, v, idx = make_inputs("clusten_av", dtype=torch.float32)
    assert clusten.clusten_av(attn, v.detach().half(), idx).dtype == torch.float32
    idx, w, feat = make_inputs("weighted_gather", dtype=torch.float32)
    assert clusten.weighted_gather(idx, w.detach().double(), feat).dtype == torch.float32


def test_autocast_runs_in_autocast_dtype():
    q, k, idx = make_inputs("clusten_qk", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clusten.clusten_qk(q, k, idx)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == torch.float32


def test_chunked_twin_equals_single_chunk(monkeypatch):
    args = make_inputs("clusten_qk")
    whole = clusten.clusten_qk(*args)
    grads = torch.autograd.grad(whole.square().sum(), args[:2])
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 7)  # forces one query per chunk
    chunked = clusten.clusten_qk(*args)
    chunked_grads = torch.autograd.grad(chunked.square().sum(), args[:2])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    for a, b in zip(chunked_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_deterministic_backward_repeats_bitwise():
    args = make_inputs("clusten_av", dtype=torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(clusten.clusten_av(*args).sum(), args[1])[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.slow
def test_torch_compile_traces_custom_ops():
    args = make_inputs("clusten_av", dtype=torch.float32)

    def attention(attn, value, idx):
        return clusten.clusten_av(attn.softmax(-1), value, idx).relu()

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    torch.testing.assert_close(out, attention(*args))
    out.sum().backward()
    assert args[0].grad is not None and args[1].grad is not None


def test_primitives_pass_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the custom ops agree."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, N, 2, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, N, M, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, N_SRC, C, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, N_SRC, (2, N, M), generator=g)
    torch.library.opcheck(torch.ops.clusten.gather_dot, (x, y, idx))
    torch.library.opcheck(torch.ops.clusten.gather_sum, (w, y, idx))
    torch.library.opcheck(torch.ops.clusten.scatter_sum, (w, x, idx, N_SRC))
