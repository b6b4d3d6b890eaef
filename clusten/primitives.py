"""The three gather primitives as torch custom ops (``torch.ops.clusten.*``).

Each op is registered with ``torch.library.custom_op`` (so ``torch.compile`` treats it as one
opaque node), a fake implementation (shapes for tracing) and an autograd formula. The set is
closed under differentiation - each primitive's gradients are again primitives - so double
backward works too. Shapes and math are in :mod:`clusten.reference`.

The op's own body is the PyTorch reference (every device without a kernel of its own); CPU
tensors run ``gather_dot``/``gather_sum`` as sparse-matrix products (:mod:`clusten.cpu`, the
faster CPU path by measurement) unless the backend is ``torch``; the CUDA
extension is registered for CUDA tensors with ``register_kernel("cuda", ...)`` and runs when the
backend allows it (:func:`clusten.backends.cuda_extension`; otherwise the reference runs there
too). Under ``torch.use_deterministic_algorithms(True)`` the CUDA ``scatter_sum`` replaces its
float atomics by a fixed-order segment sum over the neighbourhood index sorted by table row.
"""
import torch
from torch import Tensor

from . import backends, cpu, reference


def _contiguous(*tensors):
    return [t.contiguous() for t in tensors]


@torch.library.custom_op("clusten::gather_dot", mutates_args=())
def gather_dot(x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
    """out[g,i,j,r] = sum_c x[g,i,r,c] * y[g, idx[b,i,j], c]: ``g x n x m x r``."""
    return reference.gather_dot(x, y, idx)


@torch.library.custom_op("clusten::gather_sum", mutates_args=())
def gather_sum(w: Tensor, y: Tensor, idx: Tensor) -> Tensor:
    """out[g,i,r,c] = sum_j w[g,i,j,r] * y[g, idx[b,i,j], c]: ``g x n x r x c``."""
    return reference.gather_sum(w, y, idx)


@torch.library.custom_op("clusten::scatter_sum", mutates_args=())
def scatter_sum(w: Tensor, x: Tensor, idx: Tensor, n_src: int) -> Tensor:
    """out[g,t,c] = sum_{idx[b,i,j]=t} sum_r w[g,i,j,r] * x[g,i,r,c]: ``g x n_src x c``."""
    return reference.scatter_sum(w, x, idx, n_src)


@gather_dot.register_kernel("cpu")
def _(x, y, idx):
    if backends.get_backend() == "torch":
        return reference.gather_dot(x, y, idx)
    return cpu.gather_dot(x, y, idx)


@gather_sum.register_kernel("cpu")
def _(w, y, idx):
    if backends.get_backend() == "torch":
        return reference.gather_sum(w, y, idx)
    return cpu.gather_sum(w, y, idx)


@gather_dot.register_kernel("cuda")
def _(x, y, idx):
    ext = backends.cuda_extension(x.device)
    if ext is None:
        return reference.gather_dot(x, y, idx)
    return ext.gather_dot(*_contiguous(x, y, idx))


@gather_sum.register_kernel("cuda")
def _(w, y, idx):
    ext = backends.cuda_extension(w.device)
    if ext is None:
        return reference.gather_sum(w, y, idx)
    return ext.gather_sum(*_contiguous(w, y, idx))


@scatter_sum.register_kernel("cuda")
def _(w, x, idx, n_src):
    ext = backends.cuda_extension(w.device)
    if ext is None:
        return reference.scatter_sum(w, x, idx, n_src)
    w, x, idx = _contiguous(w, x, idx)
    if not torch.are_deterministic_algorithms_enabled():
        return ext.scatter_sum_atomic(w, x, idx, n_src)
    # Segments of (query, neighbour) slots per table row, in ascending slot order.
    b, n, m = idx.shape
    row = (idx + torch.arange(b, device=idx.device).view(b, 1, 1) * n_src).reshape(-1)
    order = torch.sort(row, stable=True).indices
    bounds = torch.arange(b * n_src + 1, device=idx.device, dtype=row.dtype)
    offsets = torch.searchsorted(row[order], bounds)
    return ext.scatter_sum_sorted(w, x, order, offsets, n_src)


@gather_dot.register_fake
def _(x, y, idx):
    return x.new_empty(x.shape[0], x.shape[1], idx.shape[-1], x.shape[2])


@gather_sum.register_fake
def _(w, y, idx):
    return w.new_empty(w.shape[0], w.shape[1], w.shape[3], y.shape[-1])


@scatter_sum.register_fake
def _(w, x, idx, n_src):
    return w.new_empty(w.shape[0], n_src, x.shape[-1])


def _save_tensors(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.n_src = inputs[1].shape[1] if len(inputs) == 3 else inputs[3]


def _gather_dot_backward(ctx, grad):
    x, y, idx = ctx.saved_tensors
    grad = grad.to(x.dtype).contiguous()
    dx = gather_sum(grad, y, idx) if ctx.needs_input_grad[0] else None
    dy = scatter_sum(grad, x, idx, ctx.n_src) if ctx.needs_input_grad[1] else None
    return dx, dy, None


def _gather_sum_backward(ctx, grad):
    w, y, idx = ctx.saved_tensors
    grad = grad.to(w.dtype).contiguous()
    dw = gather_dot(grad, y, idx) if ctx.needs_input_grad[0] else None
    dy = scatter_sum(w, grad, idx, ctx.n_src) if ctx.needs_input_grad[1] else None
    return dw, dy, None


def _scatter_sum_backward(ctx, grad):
    w, x, idx = ctx.saved_tensors
    grad = grad.to(w.dtype).contiguous()
    dw = gather_dot(x, grad, idx) if ctx.needs_input_grad[0] else None
    dx = gather_sum(w, grad, idx) if ctx.needs_input_grad[1] else None
    return dw, dx, None, None


gather_dot.register_autograd(_gather_dot_backward, setup_context=_save_tensors)
gather_sum.register_autograd(_gather_sum_backward, setup_context=_save_tensors)
scatter_sum.register_autograd(_scatter_sum_backward, setup_context=_save_tensors)
