"""Fused cluster attention: the PyTorch twin against a naive loop and autograd, and the Triton
kernels (run by Triton's interpreter on CPU tensors) against the twin."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import clusten
import clusten.attention as attention
from clusten import cluster_attention, cluster_attention_reference

KERNEL_MODULE = "clusten.attention_triton"


def _inputs(b=1, h=2, n=10, n_src=None, c=8, m=12, masked=True, dtype=torch.float64, seed=0, mask_dtype=torch.int64,
            device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n_src = n if n_src is None else n_src

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    mask = None
    if masked:
        mask = (torch.rand(b, n, m, generator=g) > 0.25).to(mask_dtype)
        mask[..., 0] = 1
    inputs = dict(query=randn(b, h, n, c) * c ** -0.5, key=randn(b, h, n_src, c), value=randn(b, h, n_src, c),
                  nbhd_idx=torch.randint(0, n_src, (b, n, m), generator=g), bias=randn(b, h, n, m), mask=mask,
                  blank_k=randn(h, c), blank_v=randn(h, c))
    return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}


def _naive(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """Query by query, head by head, in float64, straight from the paper's attention formula (docs/aff.md)."""
    b, h, n, c = query.shape
    out = torch.zeros(b, h, n, c, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                q = query[bi, hi, i].double()
                logits = []
                for j, t in enumerate(nbhd_idx[bi, i].tolist()):
                    a = q @ key[bi, hi, t].double() + bias[bi, hi, i, j].double()
                    if mask is not None:
                        a = a + (1 - float(mask[bi, i, j])) * -100.0
                    logits.append(a)
                logits.append(q @ blank_k[hi].double())
                p = torch.softmax(torch.stack(logits), 0)
                rows = [value[bi, hi, t].double() for t in nbhd_idx[bi, i].tolist()] + [blank_v[hi].double()]
                out[bi, hi, i] = (p[:, None] * torch.stack(rows)).sum(0)
    return out


GRAD_NAMES = ("query", "key", "value", "bias", "blank_k", "blank_v")


def _grads(fn, inputs, grad_out):
    leaves = {k: (v.detach().requires_grad_(True) if k in GRAD_NAMES else v) for k, v in inputs.items()}
    out = fn(**leaves)
    out.backward(grad_out)
    return out.detach(), [leaves[k].grad for k in GRAD_NAMES]


# ---------------------------------------------------------------------------- PyTorch twin


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("m", [12, 20])
def test_twin_matches_naive_loop(masked, m):
    inputs = _inputs(b=2, n=9, n_src=13, m=m, masked=masked, seed=m)
    expected = _naive(**inputs)
    torch.testing.assert_close(cluster_attention_reference(**inputs), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cluster_attention(**inputs), expected, rtol=1e-12, atol=1e-12)


def test_masked_slot_acts_as_minus_100_logit():
    inputs = _inputs(n=6, m=8, seed=3)
    inputs["mask"][:] = 1
    inputs["mask"][0, 2, 5] = 0
    shifted = dict(inputs, mask=None, bias=inputs["bias"].clone())
    shifted["bias"][0, :, 2, 5] -= 100.0
    torch.testing.assert_close(cluster_attention(**inputs), cluster_attention(**shifted), rtol=0, atol=1e-14)


def test_blank_token_takes_the_mass_when_neighbours_are_masked():
    inputs = _inputs(n=5, m=8, seed=4)
    inputs["mask"][:] = 0
    inputs["blank_k"] = inputs["blank_k"] * 0  # blank logit 0 >> every neighbour logit - 100
    out = cluster_attention(**inputs)
    torch.testing.assert_close(out, inputs["blank_v"].view(1, 2, 1, 8).expand_as(out), rtol=0, atol=1e-30)


def test_twin_gradcheck_float64():
    inputs = _inputs(n=6, n_src=7, c=4, m=5, seed=5)
    names = [k for k in inputs if k in GRAD_NAMES]

    def fn(impl):
        def run(*tensors):
            return impl(**dict(inputs, **dict(zip(names, tensors))))
        return run

    tensors = [inputs[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(fn(cluster_attention_reference), tensors)
    assert torch.autograd.gradcheck(fn(cluster_attention), tensors)  # the op's explicit backward formulas


def test_op_backward_matches_autograd_of_twin():
    inputs = _inputs(b=2, n=11, m=20, seed=6)
    grad_out = torch.randn(2, 2, 11, 8, dtype=torch.float64)
    out, grads = _grads(cluster_attention, inputs, grad_out)
    ref_out, ref_grads = _grads(cluster_attention_reference, inputs, grad_out)
    torch.testing.assert_close(out, ref_out)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def _opcheck_both_ops(inputs):
    """torch.library.opcheck (schema, fake tensors, autograd registration) of the forward and backward ops."""
    args = tuple(v.requires_grad_(True) if k in GRAD_NAMES else v for k, v in inputs.items())
    torch.library.opcheck(torch.ops.clusten.cluster_attention_fwd.default, args)
    plain = tuple(a.detach() if a is not None else None for a in args)
    out, lse = torch.ops.clusten.cluster_attention_fwd(*plain)
    grad_args = (torch.randn_like(out),) + plain + (out, lse)
    torch.library.opcheck(torch.ops.clusten.cluster_attention_bwd.default, grad_args)


@pytest.mark.parametrize("masked", [True, False])
def test_custom_ops_pass_opcheck(masked):
    _opcheck_both_ops(_inputs(n=6, m=8, masked=masked, dtype=torch.float32, seed=9))


def test_output_is_stored_heads_last():
    out = cluster_attention(**_inputs(b=2, n=7, seed=7))
    assert out.shape == (2, 2, 7, 8)
    assert out.transpose(1, 2).is_contiguous()


class _RecordedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the ops dispatched inside the region."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inference_runs_the_chain_without_the_op(dtype):
    """No gradient needed on CPU: the op's forward minus its logsumexp, same output and layout."""
    inputs = _inputs(b=2, n=15, m=20, dtype=dtype, seed=16, mask_dtype=torch.bool)
    with torch.no_grad(), _RecordedOps() as recorded:
        out = cluster_attention(**inputs)
    assert "clusten.cluster_attention_fwd.default" not in recorded.names
    assert "aten.logsumexp.default" not in recorded.names
    assert "aten.sparse_sampled_addmm.default" in recorded.names  # clusten.cpu.cluster_attention
    op_out, _ = torch.ops.clusten.cluster_attention_fwd(*inputs.values())
    assert out.dtype == dtype and torch.equal(out, op_out) and out.transpose(1, 2).is_contiguous()
    with torch.no_grad(), clusten.backend("torch"), _RecordedOps() as recorded:  # the reference's products
        torch.testing.assert_close(cluster_attention(**inputs), out, rtol=1e-2, atol=1e-2)
    assert "aten.sparse_sampled_addmm.default" not in recorded.names
    # with a gradient to compute, the op runs (its backward needs the logsumexp)
    leaves = {k: (v.requires_grad_(True) if k == "query" else v) for k, v in inputs.items()}
    with _RecordedOps() as recorded:
        cluster_attention(**leaves)
    assert "clusten.cluster_attention_fwd.default" in recorded.names


def test_bad_arguments_are_named():
    inputs = _inputs(seed=8)
    with pytest.raises(ValueError, match="bias"):
        cluster_attention(**dict(inputs, bias=inputs["bias"][..., :-1]))
    with pytest.raises(ValueError, match="blank_k"):
        cluster_attention(**dict(inputs, blank_k=inputs["blank_k"][:1]))
    with pytest.raises(IndexError, match="nbhd_idx"):
        cluster_attention(**dict(inputs, nbhd_idx=inputs["nbhd_idx"] + 100))
    with pytest.raises(TypeError, match="nbhd_idx"):
        cluster_attention(**dict(inputs, nbhd_idx=inputs["nbhd_idx"].float()))


# ---------------------------------------------------------------------------- Triton (interpreter)


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture
def kernels():
    """The Triton kernel module, on the device the kernels can run on here.

    With ``TRITON_INTERPRET=1`` (set before Python starts: Triton reads it when ``triton`` is
    first imported) the kernels run in Triton's interpreter on CPU tensors; otherwise they need
    a CUDA device. ``test_kernels_in_triton_interpreter`` runs these tests in a subprocess
    with the interpreter on.
    """
    pytest.importorskip("triton")
    if not INTERPRETING and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (see test_kernels_in_triton_interpreter)")
    return importlib.import_module(KERNEL_MODULE)


DEVICE = "cpu" if INTERPRETING or not torch.cuda.is_available() else "cuda"


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
def test_kernels_in_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "test_triton_", "-p", "no:cacheprovider"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def _kernel_vs_twin(kernels, inputs, grad_out, tol):
    """Forward and backward of the kernels against the twin's, both computed from the same inputs."""
    assert attention.use_triton(inputs["query"])
    out, lse = kernels.forward(**inputs)
    ref_out, ref_lse = attention.reference_forward(**inputs)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(lse, ref_lse.float(), **tol)
    assert out.dtype == inputs["query"].dtype and out.transpose(1, 2).is_contiguous()
    grads = kernels.backward(grad_out, *inputs.values(), out, lse)
    ref_grads = attention.reference_backward(grad_out, *inputs.values(), out, lse)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        assert got.dtype == inputs[name].dtype, name
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=name)


@pytest.mark.skipif(INTERPRETING, reason="compiles for a GPU target")
@pytest.mark.parametrize("kernel_name", ["_forward_kernel", "_backward_kernel"])
def test_kernels_compile_for_gpu_targets(kernel_name):
    """Ahead-of-time compile to sm_90 machine code (no GPU needed): catches what the interpreter accepts
    but the compiler rejects."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(KERNEL_MODULE), kernel_name)
    float32_buffers = {"lse_ptr", "dk_ptr", "dv_ptr", "dbk_ptr", "dbv_ptr", "bk_ptr", "bv_ptr"}
    signature, constants = {}, {"HAS_MASK": True, "BLOCK_Q": 8, "BLOCK_M": 16, "BLOCK_C": 32}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = {"idx_ptr": "*i64", "mask_ptr": "*i1"}.get(
                name, "*fp32" if name in float32_buffers else "*bf16")
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert len(compiled.asm["cubin"]) > 0


FP32_TOL = dict(rtol=1e-5, atol=1e-5)
HALF_TOL = dict(rtol=2e-2, atol=2e-2)  # same low-precision inputs on both sides; outputs rounded once


@pytest.mark.parametrize("m,masked", [(48, True), (144, False), (20, True)])
def test_triton_float32_matches_twin(kernels, m, masked):
    inputs = _inputs(b=2, n=21, n_src=17, c=12, m=m, masked=masked, dtype=torch.float32, seed=m,
                     device=DEVICE)
    grad_out = torch.randn(2, 2, 21, 12, device=DEVICE)
    _kernel_vs_twin(kernels, inputs, grad_out, FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_matches_twin(kernels, dtype):
    inputs = _inputs(n=19, c=16, m=48, dtype=dtype, seed=11, mask_dtype=torch.bool, device=DEVICE)
    inputs["blank_k"] = inputs["blank_k"].float()  # float32 parameters next to half activations, as under autocast
    inputs["nbhd_idx"] = inputs["nbhd_idx"].int()
    grad_out = torch.randn(1, 2, 19, 16, device=DEVICE).to(dtype)
    _kernel_vs_twin(kernels, inputs, grad_out, HALF_TOL)


def test_triton_op_autograd_and_strided_inputs(kernels, monkeypatch):
    # q/k/v as head-splitting views of token-major projections (non-contiguous), through the custom op.
    b, n, h, c, m = 1, 18, 2, 8, 48
    base = _inputs(b=b, h=h, n=n, c=c, m=m, dtype=torch.float32, seed=12, device=DEVICE)
    kv = torch.randn(b, n, h, 2, c, device=DEVICE)
    # The bias as a per-(query, neighbour) Linear(5, h) would produce it: b x n x m x h, viewed head-first.
    bias = base["bias"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    inputs = dict(base, query=base["query"].transpose(1, 2).contiguous().transpose(1, 2),
                  key=kv[:, :, :, 0].transpose(1, 2), value=kv[:, :, :, 1].transpose(1, 2), bias=bias)
    assert not inputs["key"].is_contiguous() and not inputs["bias"].is_contiguous()
    grad_out = torch.randn(b, h, n, c, device=DEVICE)
    calls = []
    for name in ("forward", "backward"):
        launch = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=launch, _n=name: calls.append(_n) or _f(*a))
    out, grads = _grads(cluster_attention, inputs, grad_out)
    assert calls == ["forward", "backward"]  # the op ran the kernels
    contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ref_out, ref_grads = _grads(cluster_attention_reference, contiguous, grad_out)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32_TOL, msg=name)


def test_triton_custom_ops_pass_opcheck(kernels):
    _opcheck_both_ops(_inputs(n=6, m=20, dtype=torch.float32, seed=14, device=DEVICE))


def test_triton_deterministic_mode_uses_twin_backward(kernels, monkeypatch):
    inputs = _inputs(n=9, m=48, dtype=torch.float32, seed=13, device=DEVICE)
    grad_out = torch.randn(1, 2, 9, 8, device=DEVICE)
    monkeypatch.setattr(kernels, "backward", lambda *a: pytest.fail("atomic backward used in deterministic mode"))
    torch.use_deterministic_algorithms(True)
    try:
        _, grads = _grads(cluster_attention, inputs, grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    _, ref_grads = _grads(cluster_attention_reference, inputs, grad_out)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32_TOL, msg=name)


@pytest.mark.parametrize("shape", [dict(b=2, n=15, m=20), dict(b=1, h=4, n=40, n_src=30, m=48, masked=False),
                                   dict(b=3, n=37, m=10, mask_dtype=torch.int64), dict(b=1, n=4, n_src=2, m=6)])
def test_pytorch_path_is_the_reference_bit_for_bit(shape, monkeypatch):
    """On CPU the fused op's forward is the reference chain itself (float32: no extra rounding), in
    clusten.cpu.cluster_attention's form and (one query per chunk) in pieces; m > table rows: the
    chain's own products."""
    inputs = _inputs(dtype=torch.float32, seed=15, **{"mask_dtype": torch.bool, **shape})
    expected = cluster_attention_reference(**inputs)
    assert torch.equal(cluster_attention(**inputs), expected)
    monkeypatch.setattr(clusten.cpu, "CHUNK_ENTRIES", 1)
    assert torch.equal(cluster_attention(**inputs), expected)
