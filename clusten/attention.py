"""Fused cluster attention: AFF's local attention (spec section 3.3) as one op.

For query i of head h (``q`` already scaled by c'^-0.5, as the original's projection does):

    a_ij = q_i . k[idx_ij] + bias_ij + (1 - mask_ij) * (-100)      j = 1..M (mask term if a mask is given)
    a_i0 = q_i . blank_k[h]                                          (the blank token, no bias)
    p    = softmax over the M + 1 logits
    out_i = sum_j p_ij v[idx_ij] + p_i0 blank_v[h]

Two implementations of the same custom op (``torch.ops.clusten.cluster_attention_fwd`` / ``_bwd``):

- Triton (:mod:`clusten.attention_triton`): one pass per tile of queries with an online
  softmax in float32; the forward writes only the output and the per-query logsumexp, the
  backward recomputes the probabilities from the logsumexp and scatters the key/value
  gradients with float32 atomics (summation order, hence the last bits, is not deterministic;
  under ``torch.use_deterministic_algorithms(True)`` the backward runs the twin's formulas).
  Used for float32/float16/bfloat16 CUDA tensors, and for CPU tensors when
  ``TRITON_INTERPRET=1`` (Triton's interpreter; this is how CI tests the kernels).
- The PyTorch twin (this module), built on the gather primitives of :mod:`clusten.reference`:
  the CPU path, the float64 path, the fallback when Triton is missing or
  ``CLUSTEN_BACKEND=torch``, and the reference the kernels are tested against. Its backward
  uses the same formulas as the kernel.

float16/bfloat16 inputs accumulate in float32. Inputs may mix dtypes (e.g. bfloat16 q/k/v under
autocast with float32 ``blank_k``); the output has ``query``'s dtype and every gradient its
input's dtype.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from . import build, reference
from .validation import check

MASK_LOGIT = -100.0  # added to the logit of a padded neighbour slot, as in the original
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
    _check(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    out, _ = torch.ops.clusten.cluster_attention_fwd(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    return out


def cluster_attention_reference(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """The PyTorch twin of :func:`cluster_attention` with plain autograd (same arguments)."""
    _check(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    return _twin_forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)[0].to(query.dtype)


def _check(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    # Index values are range-checked where it costs no device sync (CPU tensors).
    index_kind = "index:n_" if nbhd_idx.device.type == "cpu" else "shape"
    args = [("query", query, "b h n c", "float"), ("key", key, "b h n_ c", "float"),
            ("value", value, "b h n_ c", "float"), ("nbhd_idx", nbhd_idx, "b n m", index_kind),
            ("bias", bias, "b h n m", "float"), ("blank_k", blank_k, "h c", "float"),
            ("blank_v", blank_v, "h c", "float")]
    if mask is not None:
        args.append(("mask", mask, "b n m", "shape"))
    check("cluster_attention", args)
    if nbhd_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cluster_attention: nbhd_idx must be int32 or int64, got {nbhd_idx.dtype}")


def use_triton(tensor):
    """True when the op runs the Triton kernels for tensors like ``tensor``."""
    if tensor.dtype not in TRITON_DTYPES or build.backend() == "torch":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    if tensor.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    from . import attention_triton  # imported on first use: triton reads TRITON_INTERPRET at kernel definition

    return attention_triton


def new_output(query):
    """An empty ``b x h x n x c`` tensor stored as ``b x n x h x c`` (heads merge without a copy)."""
    b, h, n, c = query.shape
    return query.new_empty(b, n, h, c).permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------- PyTorch twin


def _logits(q, key, nbhd_idx, bias, mask, blank_k):
    """Neighbour logits ``b x h x n x m`` and blank logits ``b x h x n`` from float32/64 ``q``."""
    b, h, n, c = q.shape
    g, n_src, m = b * h, key.shape[2], nbhd_idx.shape[-1]
    logits = reference.gather_dot(q.reshape(g, n, 1, c), key.to(q.dtype).reshape(g, n_src, c), nbhd_idx.long())
    logits = logits.view(b, h, n, m) + bias.to(q.dtype)
    if mask is not None:
        logits = logits + (1 - mask.to(q.dtype)).unsqueeze(1) * MASK_LOGIT
    blank = (q * blank_k.to(q.dtype).view(1, h, 1, c)).sum(-1)
    return logits, blank


def _twin_forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """Output ``b x h x n x c`` (accumulation dtype) and logsumexp ``b x h x n`` (float32/64)."""
    b, h, n, c = query.shape
    q = query.to(reference.accumulate_dtype(query.dtype))
    logits, blank = _logits(q, key, nbhd_idx, bias, mask, blank_k)
    lse = torch.logsumexp(torch.cat([logits, blank.unsqueeze(-1)], -1), -1)
    p = torch.exp(logits - lse.unsqueeze(-1))
    g, n_src, m = b * h, value.shape[2], nbhd_idx.shape[-1]
    out = reference.gather_sum(p.reshape(g, n, m, 1), value.to(q.dtype).reshape(g, n_src, c), nbhd_idx.long())
    out = out.view(b, h, n, c) + torch.exp(blank - lse).unsqueeze(-1) * blank_v.to(q.dtype).view(1, h, 1, c)
    return out, lse


def _twin_backward(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse):
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
    logits, blank = _logits(q, k, idx, bias, mask, blank_k)
    lse = lse.to(acc)
    p = torch.exp(logits - lse.unsqueeze(-1))
    p_blank = torch.exp(blank - lse)
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
    if use_triton(query):
        return _kernels().forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    out, lse = _twin_forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v)
    result = new_output(query)
    result.copy_(out)
    return result, lse.float() if query.dtype != torch.float64 else lse


@_forward_op.register_fake
def _(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return new_output(query), query.new_empty(query.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("clusten::cluster_attention_bwd", mutates_args=())
def _backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, nbhd_idx: Tensor, bias: Tensor,
                 mask: Optional[Tensor], blank_k: Tensor, blank_v: Tensor, out: Tensor,
                 lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (query, key, value, bias, blank_k, blank_v), each in its input's dtype."""
    if use_triton(query) and not torch.are_deterministic_algorithms_enabled():
        return _kernels().backward(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse)
    grads = _twin_backward(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse)
    inputs = (query, key, value, bias, blank_k, blank_v)
    return tuple(grad.to(x.dtype).contiguous() for grad, x in zip(grads, inputs))


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
