"""Triton kernels of the fused cluster attention (math in :mod:`clusten.attention`).

One program handles ``BLOCK_Q`` queries of one (batch, head) and walks their neighbourhoods in
chunks of ``BLOCK_M`` slots, gathering ``BLOCK_Q x BLOCK_M x c`` keys/values by index (each query
has its own neighbours, so the products are elementwise, not matrix multiplies). All arithmetic
is float32; any input strides are accepted, so permuted q/k/v views need no copy.

Forward: online softmax that starts from the blank token (running max = blank logit, running
sum = 1, accumulator = blank value); writes the output and the logsumexp only.
Backward: recomputes p = exp(logit - lse) per chunk, writes d bias (the logit gradient) and
d query, adds d key / d value into float32 buffers with atomics, and writes per-program partial
sums of d blank_k / d blank_v that are reduced afterwards.

Importing this module defines the kernels; Triton decides at that moment whether they run
compiled or in its interpreter (``TRITON_INTERPRET=1``).
"""
import torch
import triton
import triton.language as tl

from .reference import MASK_LOGIT

_MASK_LOGIT = tl.constexpr(MASK_LOGIT)

# Launch configurations. Chosen without a GPU, as the largest tiles that ptxas (sm_90, bf16,
# c' = 32) compiles without register spills; to be re-tuned on a GPU (clusten.benchmark --sweep).
FORWARD_CONFIG = dict(BLOCK_Q=8, BLOCK_M=16, num_warps=4)
BACKWARD_CONFIG = dict(BLOCK_Q=8, BLOCK_M=8, num_warps=4)


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, mask):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_logits(q, k_base, idx_base, bias_base, mask_base, rq, rm, rc, q_valid, c_valid, m_size,
                  s_kn, s_kc, s_in, s_im, s_bn, s_bm, s_mn, s_mm, HAS_MASK: tl.constexpr):
    """Logits ``BLOCK_Q x BLOCK_M`` (-inf outside), gathered keys, indices and validity of one chunk."""
    valid = q_valid[:, None] & (rm < m_size)[None, :]
    idx = tl.load(idx_base + rq[:, None] * s_in + rm[None, :] * s_im, mask=valid, other=0).to(tl.int64)
    gather_mask = valid[:, :, None] & c_valid[None, None, :]
    k = tl.load(k_base + idx[:, :, None] * s_kn + rc[None, None, :] * s_kc, mask=gather_mask, other=0.0)
    k = k.to(tl.float32)
    logits = tl.sum(q[:, None, :] * k, axis=2)
    logits += tl.load(bias_base + rq[:, None] * s_bn + rm[None, :] * s_bm, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_base + rq[:, None] * s_mn + rm[None, :] * s_mm, mask=valid, other=1).to(tl.float32)
        logits += (1.0 - keep) * _MASK_LOGIT
    logits = tl.where(valid, logits, float("-inf"))
    return logits, k, idx, valid, gather_mask


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, mask_ptr, bk_ptr, bv_ptr, out_ptr, lse_ptr,
    s_qb, s_qh, s_qn, s_qc, s_kb, s_kh, s_kn, s_kc, s_vb, s_vh, s_vn, s_vc,
    s_ib, s_in, s_im, s_bb, s_bh, s_bn, s_bm, s_mb, s_mn, s_mm,
    s_bkh, s_bkc, s_bvh, s_bvc, s_ob, s_oh, s_on, s_oc,
    heads, n_size, m_size, c_size,
    HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // heads
    h = pid_bh % heads
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rc = tl.arange(0, BLOCK_C)
    q_valid = rq < n_size
    c_valid = rc < c_size
    qc_mask = q_valid[:, None] & c_valid[None, :]

    q = _load_tile(q_ptr + b * s_qb + h * s_qh, rq, rc, s_qn, s_qc, qc_mask)
    blank_k = tl.load(bk_ptr + h * s_bkh + rc * s_bkc, mask=c_valid, other=0.0).to(tl.float32)
    blank_v = tl.load(bv_ptr + h * s_bvh + rc * s_bvc, mask=c_valid, other=0.0).to(tl.float32)
    running_max = tl.sum(q * blank_k[None, :], axis=1)
    running_sum = tl.full([BLOCK_Q], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_C], tl.float32) + blank_v[None, :]

    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    idx_base = idx_ptr + b * s_ib
    bias_base = bias_ptr + b * s_bb + h * s_bh
    mask_base = mask_ptr + b * s_mb
    for m0 in range(0, m_size, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        logits, k, idx, valid, gather_mask = _chunk_logits(
            q, k_base, idx_base, bias_base, mask_base, rq, rm, rc, q_valid, c_valid, m_size,
            s_kn, s_kc, s_in, s_im, s_bn, s_bm, s_mn, s_mm, HAS_MASK)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(logits - new_max[:, None])
        v = tl.load(v_base + idx[:, :, None] * s_vn + rc[None, None, :] * s_vc, mask=gather_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), axis=1)
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        running_max = new_max

    out = acc / running_sum[:, None]
    out_ptrs = out_ptr + b * s_ob + h * s_oh + rq[:, None] * s_on + rc[None, :] * s_oc
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=qc_mask)
    tl.store(lse_ptr + pid_bh * n_size + rq, running_max + tl.log(running_sum), mask=q_valid)


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, mask_ptr, bk_ptr, bv_ptr, out_ptr, lse_ptr, do_ptr,
    dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dbk_ptr, dbv_ptr,
    s_qb, s_qh, s_qn, s_qc, s_kb, s_kh, s_kn, s_kc, s_vb, s_vh, s_vn, s_vc,
    s_ib, s_in, s_im, s_bb, s_bh, s_bn, s_bm, s_mb, s_mn, s_mm,
    s_bkh, s_bkc, s_bvh, s_bvc, s_ob, s_oh, s_on, s_oc, s_db, s_dh, s_dn, s_dc,
    heads, n_size, n_src, m_size, c_size,
    HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // heads
    h = pid_bh % heads
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rc = tl.arange(0, BLOCK_C)
    q_valid = rq < n_size
    c_valid = rc < c_size
    qc_mask = q_valid[:, None] & c_valid[None, :]

    q = _load_tile(q_ptr + b * s_qb + h * s_qh, rq, rc, s_qn, s_qc, qc_mask)
    out = _load_tile(out_ptr + b * s_ob + h * s_oh, rq, rc, s_on, s_oc, qc_mask)
    d_out = _load_tile(do_ptr + b * s_db + h * s_dh, rq, rc, s_dn, s_dc, qc_mask)
    lse = tl.load(lse_ptr + pid_bh * n_size + rq, mask=q_valid, other=0.0)
    blank_k = tl.load(bk_ptr + h * s_bkh + rc * s_bkc, mask=c_valid, other=0.0).to(tl.float32)
    blank_v = tl.load(bv_ptr + h * s_bvh + rc * s_bvc, mask=c_valid, other=0.0).to(tl.float32)

    delta = tl.sum(d_out * out, axis=1)
    p_blank = tl.where(q_valid, tl.exp(tl.sum(q * blank_k[None, :], axis=1) - lse), 0.0)
    d_s_blank = p_blank * (tl.sum(d_out * blank_v[None, :], axis=1) - delta)
    d_q = d_s_blank[:, None] * blank_k[None, :]
    partial = (pid_bh * tl.num_programs(0) + pid_q) * c_size + rc
    tl.store(dbk_ptr + partial, tl.sum(d_s_blank[:, None] * q, axis=0), mask=c_valid)
    tl.store(dbv_ptr + partial, tl.sum(p_blank[:, None] * d_out, axis=0), mask=c_valid)

    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    idx_base = idx_ptr + b * s_ib
    bias_base = bias_ptr + b * s_bb + h * s_bh
    mask_base = mask_ptr + b * s_mb
    grad_base = pid_bh * n_src * c_size  # d key / d value buffers: contiguous b x h x n_ x c float32
    for m0 in range(0, m_size, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        logits, k, idx, valid, gather_mask = _chunk_logits(
            q, k_base, idx_base, bias_base, mask_base, rq, rm, rc, q_valid, c_valid, m_size,
            s_kn, s_kc, s_in, s_im, s_bn, s_bm, s_mn, s_mm, HAS_MASK)
        p = tl.exp(logits - lse[:, None])
        v = tl.load(v_base + idx[:, :, None] * s_vn + rc[None, None, :] * s_vc, mask=gather_mask, other=0.0)
        d_p = tl.sum(d_out[:, None, :] * v.to(tl.float32), axis=2)
        d_s = tl.where(valid, p * (d_p - delta[:, None]), 0.0)
        dbias_ptrs = dbias_ptr + (pid_bh * n_size + rq[:, None]) * m_size + rm[None, :]
        tl.store(dbias_ptrs, d_s.to(dbias_ptr.dtype.element_ty), mask=valid)
        d_q += tl.sum(d_s[:, :, None] * k, axis=1)
        grad_offsets = grad_base + idx[:, :, None] * c_size + rc[None, None, :]
        tl.atomic_add(dk_ptr + grad_offsets, d_s[:, :, None] * q[:, None, :], mask=gather_mask)
        tl.atomic_add(dv_ptr + grad_offsets, p[:, :, None] * d_out[:, None, :], mask=gather_mask)

    dq_ptrs = dq_ptr + (pid_bh * n_size + rq[:, None]) * c_size + rc[None, :]
    tl.store(dq_ptrs, d_q.to(dq_ptr.dtype.element_ty), mask=qc_mask)


def _block_c(c):
    return max(16, triton.next_power_of_2(c))


def _mask_args(mask, nbhd_idx):
    """The mask tensor (or any valid pointer when there is none) and its 3 strides."""
    if mask is None:
        return nbhd_idx, (0, 0, 0), False
    return mask, mask.stride(), True


def forward(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """(output ``b x h x n x c``, logsumexp ``b x h x n`` float32)."""
    b, h, n, c = query.shape
    m = nbhd_idx.shape[-1]
    out = query.new_empty(b, n, h, c).permute(0, 2, 1, 3)  # stored heads-last, as clusten.attention.new_output
    lse = torch.empty(b, h, n, dtype=torch.float32, device=query.device)
    mask_t, mask_strides, has_mask = _mask_args(mask, nbhd_idx)
    grid = (triton.cdiv(n, FORWARD_CONFIG["BLOCK_Q"]), b * h)
    _forward_kernel[grid](
        query, key, value, nbhd_idx, bias, mask_t, blank_k, blank_v, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *nbhd_idx.stride(), *bias.stride(), *mask_strides,
        *blank_k.stride(), *blank_v.stride(), *out.stride(),
        h, n, m, c,
        HAS_MASK=has_mask, BLOCK_C=_block_c(c), **FORWARD_CONFIG,
    )
    return out, lse


def backward(grad_out, query, key, value, nbhd_idx, bias, mask, blank_k, blank_v, out, lse):
    """Gradients (query, key, value, bias, blank_k, blank_v), each contiguous in its input's dtype."""
    b, h, n, c = query.shape
    n_src, m = key.shape[2], nbhd_idx.shape[-1]
    tiles = triton.cdiv(n, BACKWARD_CONFIG["BLOCK_Q"])
    f32 = dict(dtype=torch.float32, device=query.device)
    d_query = torch.empty(b, h, n, c, dtype=query.dtype, device=query.device)
    d_key = torch.zeros(b, h, n_src, c, **f32)
    d_value = torch.zeros(b, h, n_src, c, **f32)
    d_bias = torch.empty(b, h, n, m, dtype=bias.dtype, device=query.device)
    d_blank_k = torch.empty(b, h, tiles, c, **f32)
    d_blank_v = torch.empty(b, h, tiles, c, **f32)
    mask_t, mask_strides, has_mask = _mask_args(mask, nbhd_idx)
    _backward_kernel[(tiles, b * h)](
        query, key, value, nbhd_idx, bias, mask_t, blank_k, blank_v, out, lse.contiguous(), grad_out,
        d_query, d_key, d_value, d_bias, d_blank_k, d_blank_v,
        *query.stride(), *key.stride(), *value.stride(), *nbhd_idx.stride(), *bias.stride(), *mask_strides,
        *blank_k.stride(), *blank_v.stride(), *out.stride(), *grad_out.stride(),
        h, n, n_src, m, c,
        HAS_MASK=has_mask, BLOCK_C=_block_c(c), **BACKWARD_CONFIG,
    )
    return (d_query, d_key.to(key.dtype), d_value.to(value.dtype), d_bias,
            d_blank_k.sum((0, 2)).to(blank_k.dtype), d_blank_v.sum((0, 2)).to(blank_v.dtype))
