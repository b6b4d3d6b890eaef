"""CPU kernels of the gather primitives: sparse-matrix products instead of gathered copies.

A neighbourhood index ``idx`` (``b x n x m``) and weights ``w`` (``g x n x m x r``) form, per
chunk of queries, a sparse matrix ``S`` with one row per (group, query, r) and ``m`` entries per
row, at the table rows the query reads.  Then

- ``gather_sum(w, y, idx)`` is ``S @ y`` (sparse times dense), and
- ``gather_dot(x, y, idx)`` is ``x @ y^T`` sampled at the entries of ``S`` (``sampled_addmm``),

so the ``g x n x m x c`` block of gathered table rows that :mod:`clusten.reference` builds is
never written. Measured on one CPU thread at AFF-Tiny's shapes (512 x 512 input): ``gather_sum``
is 2-13x and ``gather_dot`` 3-4x faster than the chunked gather of the reference. The results
equal the reference's up to float rounding (the sums run in another order); float16/bfloat16
inputs are computed in float32, as there.  ``scatter_sum`` (gradients only) keeps the reference,
and so does ``gather_dot`` when a row has more neighbours than the table has rows (duplicates:
``sampled_addmm`` refuses more entries than a dense matrix has).

``cluster_attention`` is the fused attention's forward in CPU inference (no autograd) on the same
two products, sharing one pattern whose rows are ordered (image, query, head): the queries and the
output keep the ``b x n x h x c`` layout of the projections around the op, so neither is copied
to ``b x h x n x c``.
"""
import warnings

import torch

from . import reference
from .reference import MASK_LOGIT, accumulate_dtype, query_chunks

CHUNK_ENTRIES = 1 << 22  # sparse entries per chunk of queries (index + value: 48 MiB)
# ``gather_sum`` with at most this many neighbours per query runs ``torch.sparse.mm(..., "sum")``
# (a row-by-row sum straight into the output) instead of ``S @ y`` (whose CPU path zeroes the
# output and copies it, a cost that dominates when the rows are short). Measured on one thread:
# pixel decoder PointConv (16384 x 4 rows of 9 entries, 256 channels) 109 -> 77 ms, Shepard
# interpolation (4 entries) 16.5 -> 12.9 ms, identical results; with 48 entries per row
# (attention) ``S @ y`` is 1.3-1.6x faster.
ROW_SUM_MAX_ENTRIES = 16


def _pattern(idx, groups, n_src, r, query_major=False):
    """Row pointers and column indices of ``S`` for ``idx`` (``b x n x m``): rows ordered
    (group, query, r), or (image, query, head) with ``query_major`` (r = 1), each holding its
    query's ``m`` table rows in neighbour order."""
    b, n, m = idx.shape
    heads = groups // b
    offset = torch.arange(groups, dtype=torch.int64, device=idx.device) * n_src
    if query_major:
        cols = (idx.view(b, n, 1, m) + offset.view(b, 1, heads, 1)).reshape(-1)
    else:
        cols = (idx.view(b, 1, n, 1, m) + offset.view(b, heads, 1, 1, 1)).expand(b, heads, n, r, m).reshape(-1)
    crow = torch.arange(0, cols.numel() + 1, m, dtype=torch.int64, device=idx.device)
    return crow, cols


def _no_autocast(fn):
    """Run ``fn`` in the dtypes it casts to itself: an autocast region around the op would
    otherwise send its products to bfloat16/float16 (which the sparse CPU kernels lack)."""
    def wrapper(*args):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)
    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


def _csr(crow, cols, values, rows, n_cols):
    with warnings.catch_warnings():  # "sparse CSR support is in beta" (once per process)
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=(rows, n_cols), check_invariants=False)


def _joined(chunks):
    """The chunks concatenated along the queries (dim 1); a single chunk as it is, not copied."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


def _empty(*sizes):
    return any(s == 0 for s in sizes)


@_no_autocast
def gather_dot(x, y, idx):
    """``x`` g x n x r x c, ``y`` g x n_src x c, ``idx`` b x n x m -> g x n x m x r."""
    g, n, r, c = x.shape
    n_src, m = y.shape[1], idx.shape[-1]
    acc = accumulate_dtype(x.dtype)
    if _empty(g, n, r, c, n_src, m):
        return torch.zeros(g, n, m, r, dtype=x.dtype)
    if m > g * n_src:  # more entries per row than columns: torch's sampled_addmm refuses these
        return reference.gather_dot(x, y, idx)
    table = y.to(acc).reshape(g * n_src, c).t()
    chunks = []
    for s, e in query_chunks(n, g * r * m, CHUNK_ENTRIES):
        crow, cols = _pattern(idx[:, s:e], g, n_src, r)
        pattern = _csr(crow, cols, torch.zeros(cols.numel(), dtype=acc), g * (e - s) * r, g * n_src)
        out = torch.sparse.sampled_addmm(pattern, x[:, s:e].to(acc).reshape(-1, c), table, beta=0.0)
        chunks.append(out.values().view(g, e - s, r, m).transpose(2, 3).to(x.dtype))
    return _joined(chunks).contiguous()


@_no_autocast
def gather_sum(w, y, idx):
    """``w`` g x n x m x r, ``y`` g x n_src x c, ``idx`` b x n x m -> g x n x r x c."""
    g, n, m, r = w.shape
    n_src, c = y.shape[1], y.shape[2]
    acc = accumulate_dtype(w.dtype)
    if _empty(g, n, m, r, n_src, c):
        return torch.zeros(g, n, r, c, dtype=w.dtype)
    table = y.to(acc).reshape(g * n_src, c)
    chunks = []
    for s, e in query_chunks(n, g * r * m, CHUNK_ENTRIES):
        crow, cols = _pattern(idx[:, s:e], g, n_src, r)
        values = w[:, s:e].to(acc).transpose(2, 3).reshape(-1)
        matrix = _csr(crow, cols, values, g * (e - s) * r, g * n_src)
        out = torch.sparse.mm(matrix, table, "sum") if m <= ROW_SUM_MAX_ENTRIES else matrix @ table
        chunks.append(out.view(g, e - s, r, c).to(w.dtype))
    return _joined(chunks)


@_no_autocast
def cluster_attention(query, key, value, idx, bias, mask, blank_k, blank_v):
    """:func:`clusten.cluster_attention`'s forward without autograd (its arguments, already checked),
    the chain of :func:`clusten.cluster_attention_reference` in the accumulation dtype with the
    query-key and attention-value products as sparse-matrix products over one pattern.

    Every entry is the same arithmetic as that chain on CPU (the same dot products, bias and mask
    terms, softmax rows and row sums), so the result is the same bit for bit. Returns
    ``b x h x n x c`` in query's dtype, stored as ``b x n x h x c``; None where the chain's own
    products must run instead (an empty input, or more neighbours than the table has rows).
    """
    b, h, n, c = query.shape
    n_src, m = key.shape[2], idx.shape[-1]
    if _empty(b, h, n, c, n_src, m) or m > b * h * n_src:
        return None
    acc = accumulate_dtype(query.dtype)
    keys = key.to(acc).reshape(b * h * n_src, c)
    values = value.to(acc).reshape(b * h * n_src, c)
    blank_k, blank_v = blank_k.to(acc).view(1, 1, h, c), blank_v.to(acc).view(1, 1, h, c)
    out = query.new_empty(b, n, h, c)
    for s, e in query_chunks(n, b * h * m, CHUNK_ENTRIES):
        q = query[:, :, s:e].transpose(1, 2).to(acc)  # b x q x h x c
        rows = b * (e - s) * h
        crow, cols = _pattern(idx[:, s:e], b * h, n_src, 1, query_major=True)
        pattern = _csr(crow, cols, torch.zeros(cols.numel(), dtype=acc), rows, b * h * n_src)
        logits = torch.sparse.sampled_addmm(pattern, q.reshape(rows, c), keys.t(), beta=0.0).values()
        logits = logits.view(b, e - s, h, m) + bias[:, :, s:e].transpose(1, 2).to(acc)
        if mask is not None:
            padded = ~mask[:, s:e] if mask.dtype == torch.bool else 1 - mask[:, s:e]
            logits = logits + padded.unsqueeze(2).to(acc) * MASK_LOGIT
        blank = (q * blank_k).sum(-1, keepdim=True)
        attn = torch.cat([logits, blank], dim=-1).softmax(dim=-1)
        matrix = _csr(crow, cols, attn[..., :-1].reshape(-1), rows, b * h * n_src)
        mixed = matrix @ values if m > ROW_SUM_MAX_ENTRIES else torch.sparse.mm(matrix, values, "sum")
        out[:, s:e] = mixed.view(b, e - s, h, c) + attn[..., -1:] * blank_v
    return out.transpose(1, 2)
