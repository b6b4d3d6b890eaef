"""Fused cluster attention: AFF's local attention (see docs/aff.md) as one op.

For query i of head h (``q`` already scaled by c'^-0.5, as the original's projection does):

    a_ij = q_i . k[idx_ij] + bias_ij + (1 - mask_ij) * (-100)      j = 1..M (mask term if a mask is given)
    a_i0 = q_i . blank_k[h]                                          (the blank token, no bias)
    p    = softmax over the M + 1 logits
    out_i = sum_j p_ij v[idx_ij] + p_i0 blank_v[h]

One custom op pair (``torch.ops.clusten.cluster_attention_fwd`` / ``_bwd``), two implementations:

- the op's own body, for CPU tensors and every other device: the reference chain
  (:func:`clusten.cluster_attention_reference`) in the accumulation dtype, plus the logsumexp
  the backward needs; the backward formulas below, in PyTorch. On CPU, when no gradient is
  needed, ``cluster_attention`` runs that chain without the op and its logsumexp (same
  output; the op was measured 10-15% slower at AFF-Tiny's shapes), as
  :func:`clusten.cpu.cluster_attention` (the same arithmetic without the copies to and from
  ``b x h x n x c``; the reference's products under the ``torch`` backend);
- Triton (:mod:`clusten.attention_triton`), registered for CUDA tensors (and for CPU tensors
  under Triton's interpreter, ``TRITON_INTERPRET=1``, which is how CI tests the kernels): one
  pass per tile of queries with an online softmax in float32; the forward writes only the
  output and the per-query logsumexp, the backward recomputes the probabilities from the
  logsumexp and scatters the key/value gradients with float32 atomics (summation order, hence
  the last bits, is not deterministic; under ``torch.use_deterministic_algorithms(True)`` the
  backward runs the PyTorch formulas). float64 inputs, and the ``torch`` backend
  (:mod:`clusten.backends`), run the PyTorch path on every device.

float16/bfloat16 inputs accumulate in float32. Inputs may mix dtypes (e.g. bfloat16 q/k/v under
autocast with float32 ``blank_k``); the output has ``query``'s dtype and every gradient its
input's dtype.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from . import backends, cpu, reference
from .ops import _attention_scores, _check_attention, attention_logits

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cluster_attention(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """Softmax attention of every query over its neighbourhood and the blank token, fused.

    Args:
        query: ``b x h x n x c`` float, already multiplied by c^-0.5.
        key: ``b x h x n_ x c`` float.
        value: ``b x h x n_ x c`` float.
        nbhd_idx: ``b x n x m`` int32/int64, values in ``[0, n_)``: each query's neighbours.
        bias: ``b x h x n x m`` float, the relative-position bias of each (query, neighbour).
        mask: ``b x n x m`` (1 = real neighbour, 0 = padded slot; int, bool or float) or None.
        blank_k: ``h x c`` float, the blank token's key per head.
        blank_v: ``h x c`` float, the blank token's value per head.
    Returns:
        ``b x h x n x c`` in query's dtype. Its memory is laid out as ``b x n x h x c``, so
        merging the heads (``out.transpose(1, 2).reshape(b, n, h * c)``) needs no copy.
    """
    # index values are range-checked where it costs no device sync (CPU tensors)
    index_kind = "index:n_" if nbhd_idx.device.type == "cpu" else "shape"
    _check_attention("cluster_attention", query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, index_kind)
    if _chain_on_cpu(query, key, value, bias, blank_k, blank_v):
        # traced (torch.jit.trace, as fvcore's FLOP count does) or compiled: the chain's recorded ops
        if backends.get_backend() != "torch" and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            with torch.profiler.record_function("clusten::cluster_attention_cpu"):  # named in profiles
                out = cpu.cluster_attention(query, key, value, nbhd_idx.long(), bias, mask, blank_k, blank_v)
            if out is not None:
                return out
        out, _ = _reference_scores(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
        return new_output(query).copy_(out)
    out, _ = torch.ops.clusten.cluster_attention_fwd(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    return out


def _chain_on_cpu(query, *inputs):
    """CPU tensors, no gradient needed, and not Triton's interpreter: the op's PyTorch forward
    minus the logsumexp (which only its backward reads) is all there is to run."""
    if query.device.type != "cpu" or (INTERPRETING and use_triton(query)):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, *inputs)))


# Triton reads TRITON_INTERPRET when it is imported; so does this module, once.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DEVICES = ("cuda", "cpu") if INTERPRETING else ("cuda",)


def use_triton(tensor):
    """True when the op runs the Triton kernels for tensors like ``tensor`` (on a kernel device).

    float64 always runs the PyTorch path, and so does every dtype under the ``torch`` backend;
    a missing Triton falls back to it under ``auto`` and raises under ``cuda``.
    """
    if tensor.dtype not in TRITON_DTYPES or backends.get_backend() == "torch":
        return False
    try:
        import triton  # noqa: F401
    except ImportError as err:
        backends.refuse_or_fall_back("the Triton attention kernels", f"{type(err).__name__}: {err}")
        return False
    return True


def _kernels():
    from . import attention_triton  # imported on first use: triton reads TRITON_INTERPRET at kernel definition

    return attention_triton


def new_output(query):
    """An empty ``b x h x n x c`` tensor stored as ``b x n x h x c`` (heads merge without a copy)."""
    b, h, n, c = query.shape
    return query.new_empty(b, n, h, c).permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------- PyTorch path


def reference_forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """The reference chain in the accumulation dtype: (output ``b x h x n x c`` in that dtype,
    logsumexp ``b x h x n``, float32 or float64), what the PyTorch path of the op returns.
    Autocast is off inside: the op computes in the accumulation dtype whatever the region."""
    out, scores = _reference_scores(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    return out, torch.logsumexp(scores, dim=-1)


def _reference_scores(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """(output, ``b x h x n x (m + 1)`` logits) of the reference chain in the accumulation dtype."""
    acc = reference.accumulate_dtype(query.dtype)
    with torch.autocast(query.device.type, enabled=False):
        return _attention_scores(query.to(acc), key.to(acc), value.to(acc), nbhd_idx, bias.to(acc), mask,
                                 blank_k.to(acc), blank_v.to(acc), dropout_p=0.0)


def reference_backward(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse):
    """Gradients (query, key, value, bias, blank_k, blank_v) from the saved output and logsumexp.

    With p the probabilities, dP_ij = dO_i . v[idx_ij] and D_i = dO_i . O_i:
    dS = p (dP - D) is the logit gradient (= d bias), dq = sum_j dS_ij k[idx_ij] + dS_i0 blank_k,
    dk[t] = sum_{idx_ij = t} dS_ij q_i, dv[t] = sum_{idx_ij = t} p_ij dO_i.
    """
    b, h, n, c = query.shape
    g, n_src, m = b * h, key.shape[2], nbhd_idx.shape[-1]
    acc = reference.accumulate_dtype(query.dtype)
    idx = nbhd_idx.long()
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    d_out = grad_out.to(acc)
    with torch.autocast(query.device.type, enabled=False):
        logits, blank = attention_logits(q, k, idx, bias, mask, blank_k)
    lse = lse.to(acc)
    p = torch.exp(logits - lse.unsqueeze(-1))
    p_blank = torch.exp(blank.squeeze(-1) - lse)
    delta = (d_out * out.to(acc)).sum(-1)
    d_p = reference.gather_dot(d_out.reshape(g, n, 1, c), v.reshape(g, n_src, c), idx).view(b, h, n, m)
    d_s = p * (d_p - delta.unsqueeze(-1))
    d_s_blank = p_blank * ((d_out * blank_v.to(acc).view(1, h, 1, c)).sum(-1) - delta)
    d_q = reference.gather_sum(d_s.reshape(g, n, m, 1), k.reshape(g, n_src, c), idx).view(b, h, n, c)
    d_q = d_q + d_s_blank.unsqueeze(-1) * blank_k.to(acc).view(1, h, 1, c)
    d_k = reference.scatter_sum(d_s.reshape(g, n, m, 1), q.reshape(g, n, 1, c), idx, n_src).view(b, h, n_src, c)
    d_v = reference.scatter_sum(p.reshape(g, n, m, 1), d_out.reshape(g, n, 1, c), idx, n_src).view(b, h, n_src, c)
    d_blank_k = torch.einsum("bhn,bhnc->hc", d_s_blank, q)
    d_blank_v = torch.einsum("bhn,bhnc->hc", p_blank, d_out)
    return d_q, d_k, d_v, d_s, d_blank_k, d_blank_v


# ---------------------------------------------------------------------------- custom ops


@torch.library.custom_op("clusten::cluster_attention_fwd", mutates_args=())
def _forward_op(query: Tensor, key: Tensor, value: Tensor, nbhd_idx: Tensor, bias: Tensor, mask: Optional[Tensor],
                blank_k: Tensor, blank_v: Tensor) -> tuple[Tensor, Tensor]:
    """(output ``b x h x n x c``, logsumexp ``b x h x n`` float32/64) of the fused attention."""
    return _forward_pytorch(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)


def _forward_pytorch(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    out, lse = reference_forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    result = new_output(query)
    result.copy_(out)
    return result, lse.float() if query.dtype != torch.float64 else lse


@_forward_op.register_kernel(KERNEL_DEVICES)
def _(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    if not use_triton(query):
        return _forward_pytorch(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    return _kernels().forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)


@_forward_op.register_fake
def _(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return new_output(query), query.new_empty(query.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("clusten::cluster_attention_bwd", mutates_args=())
def _backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, nbhd_idx: Tensor, bias: Tensor,
                 mask: Optional[Tensor], blank_k: Tensor, blank_v: Tensor, out: Tensor,
                 lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (query, key, value, bias, blank_k, blank_v), each in its input's dtype."""
    return _backward_pytorch(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse)


def _backward_pytorch(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse):
    grads = reference_backward(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse)
    inputs = (query, key, value, bias, blank_k, blank_v)
    return tuple(grad.to(x.dtype).contiguous() for grad, x in zip(grads, inputs))


@_backward_op.register_kernel(KERNEL_DEVICES)
def _(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse):
    if not use_triton(query) or torch.are_deterministic_algorithms_enabled():
        return _backward_pytorch(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse)
    return _kernels().backward(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse)


@_backward_op.register_fake
def _(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format)
                 for x in (query, key, value, bias, blank_k, blank_v))


def _setup_context(ctx, inputs, output):
    query, key, value, nbhd_idx, bias, mask, blank_k, blank_v = inputs
    ctx.save_for_backward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, *output)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse = ctx.saved_tensors
    d_q, d_k, d_v, d_bias, d_blank_k, d_blank_v = torch.ops.clusten.cluster_attention_bwd(
        grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse)
    return d_q, d_k, d_v, None, d_bias, None, d_blank_k, d_blank_v


_forward_op.register_autograd(_backward, setup_context=_setup_context)
