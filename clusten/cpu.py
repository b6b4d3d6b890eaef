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
"""
import warnings

import torch

from . import reference
from .reference import accumulate_dtype, query_chunks

CHUNK_ENTRIES = 1 << 22  # sparse entries per chunk of queries (index + value: 48 MiB)
# ``gather_sum`` with at most this many neighbours per query runs ``torch.sparse.mm(..., "sum")``
# (a row-by-row sum straight into the output) instead of ``S @ y`` (whose CPU path zeroes the
# output and copies it, a cost that dominates when the rows are short). Measured on one thread:
# pixel decoder PointConv (16384 x 4 rows of 9 entries, 256 channels) 109 -> 77 ms, Shepard
# interpolation (4 entries) 16.5 -> 12.9 ms, identical results; with 48 entries per row
# (attention) ``S @ y`` is 1.3-1.6x faster.
ROW_SUM_MAX_ENTRIES = 16


def _pattern(idx, groups, n_src, r):
    """Row pointers and column indices of ``S`` for ``idx`` (``b x n x m``): rows ordered
    (group, query, r), each holding its query's ``m`` table rows in neighbour order."""
    b, n, m = idx.shape
    heads = groups // b
    offset = torch.arange(groups, dtype=torch.int64, device=idx.device).view(b, heads, 1, 1, 1) * n_src
    cols = (idx.view(b, 1, n, 1, m) + offset).expand(b, heads, n, r, m).reshape(-1)  # one pass when r = 1
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
