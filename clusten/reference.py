"""Pure-PyTorch twins of the three gather primitives behind every clusten op.

All five AFF neighbourhood ops (and their gradients) are compositions of three primitives
over a *table* of rows ``y`` that each query reads through its neighbourhood index:

- ``gather_dot(x, y, idx)``:  out[g,i,j,r] = sum_c x[g,i,r,c] * y[g, idx[b,i,j], c]
- ``gather_sum(w, y, idx)``:  out[g,i,r,c] = sum_j w[g,i,j,r] * y[g, idx[b,i,j], c]
- ``scatter_sum(w, x, idx, n_src)``:
  out[g,t,c] = sum over (i, j) with idx[b,i,j] == t of sum_r w[g,i,j,r] * x[g,i,r,c]

Shapes: ``g = b * h`` groups (batch times heads; group g uses ``idx[g // h]``), ``n`` queries,
``m`` neighbours, ``r`` rows per query (1 for attention, ``ic`` for PointConv), ``c`` channels,
``n_src`` table rows. ``x`` is ``g x n x r x c``, ``w`` is ``g x n x m x r``, ``y`` is
``g x n_src x c`` and ``idx`` is ``b x n x m`` int64 with values in ``[0, n_src)``.

These functions are the CPU path, the fallback on any device and the oracle the CUDA kernels
are tested against. They work on chunks of queries so the gathered ``g x chunk x m x c`` block
stays below ``CHUNK_ELEMENTS`` elements (a block that small stays in the CPU caches between the
gather and the product that reads it, and its memory is reused instead of being mapped afresh:
measured at AFF-Tiny's attention shapes, 1<<20 is about 2x faster than 1<<24), accumulate half-precision inputs in float32, and return
the input dtype. ``scatter_sum`` uses ``index_put_(accumulate=True)`` (on CPU about 10x faster
than ``index_add_``), which is deterministic on CUDA and which PyTorch makes deterministic on
CPU under ``torch.use_deterministic_algorithms(True)``.
"""
import torch

CHUNK_ELEMENTS = 1 << 20  # gathered elements per chunk (4 MiB in float32)
# cluster attention: added to the logit of a padded neighbour slot, as in the original
MASK_LOGIT = -100.0


def accumulate_dtype(dtype):
    """float32 for float16/bfloat16 (fp32 accumulation), the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def query_chunks(n, elements_per_query, budget=None):
    """``(start, end)`` ranges of at most ``budget // elements_per_query`` queries (at least 1;
    ``budget`` None: ``CHUNK_ELEMENTS``, read at each call);
    a single range when the sizes are symbolic (``torch.export``), so that the graph holds no
    size-dependent loop."""
    if not isinstance(n * elements_per_query, int):
        yield 0, n
        return
    step = max(1, (budget or CHUNK_ELEMENTS) // max(1, elements_per_query))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _table_rows(idx, groups, n_src):
    """Row numbers into ``y.reshape(g * n_src, c)``: ``b x n x m`` -> ``g x n x m`` int64."""
    b, n, m = idx.shape
    heads = groups // b
    offset = torch.arange(groups, device=idx.device, dtype=torch.int64).view(groups, 1, 1) * n_src
    return idx.unsqueeze(1).expand(b, heads, n, m).reshape(groups, n, m) + offset


def _gather(y, rows):
    """``y``: ``g x n_src x c``, rows ``g x n x m`` -> ``g x n x m x c``."""
    c = y.shape[-1]
    return y.reshape(-1, c).index_select(0, rows.reshape(-1)).view(*rows.shape, c)


def gather_dot(x, y, idx):
    """``x`` g x n x r x c, ``y`` g x n_src x c, ``idx`` b x n x m -> g x n x m x r."""
    g, n, r, c = x.shape
    m = idx.shape[-1]
    acc = accumulate_dtype(x.dtype)
    chunks = []  # concatenated, not written into a buffer: the function stays functional (export)
    for s, e in query_chunks(n, g * m * c):
        rows = _table_rows(idx[:, s:e], g, y.shape[1])
        chunks.append(torch.einsum("girc,gimc->gimr", x[:, s:e].to(acc), _gather(y, rows).to(acc)).to(x.dtype))
    return torch.cat(chunks, dim=1)


def gather_sum(w, y, idx):
    """``w`` g x n x m x r, ``y`` g x n_src x c, ``idx`` b x n x m -> g x n x r x c."""
    g, n, m, r = w.shape
    c = y.shape[-1]
    acc = accumulate_dtype(w.dtype)
    chunks = []
    for s, e in query_chunks(n, g * m * c):
        rows = _table_rows(idx[:, s:e], g, y.shape[1])
        chunks.append(torch.einsum("gimr,gimc->girc", w[:, s:e].to(acc), _gather(y, rows).to(acc)).to(w.dtype))
    return torch.cat(chunks, dim=1)


def scatter_sum(w, x, idx, n_src):
    """``w`` g x n x m x r, ``x`` g x n x r x c, ``idx`` b x n x m -> g x n_src x c."""
    g, n, m, _ = w.shape
    c = x.shape[-1]
    acc = accumulate_dtype(w.dtype)
    out = torch.zeros(g * n_src, c, dtype=acc, device=w.device)
    for s, e in query_chunks(n, g * m * c):
        rows = _table_rows(idx[:, s:e], g, n_src)
        contrib = torch.einsum("gimr,girc->gimc", w[:, s:e].to(acc), x[:, s:e].to(acc))
        out.index_put_((rows.reshape(-1),), contrib.reshape(-1, c), accumulate=True)
    return out.view(g, n_src, c).to(w.dtype)


def k_smallest(sq, k):
    """First k entries of a stable ascending sort of each row of ``sq`` (``... x n_``), and their values:
    the nearest-neighbour tie rule (ties to the lower index), used by every KNN search.

    A topk finds the k-th smallest value v; every entry below v is taken, then the entries equal
    to v lowest index first until there are k.  Both steps are whole-tensor ops with static
    shapes (no host-device synchronisation), so the search can be captured by CUDA graphs.
    The k are finally ordered by (value, index).
    """
    kth = sq.topk(k, dim=-1, largest=False, sorted=True).values[..., -1:]
    below = sq < kth
    tied = sq == kth
    room = k - below.sum(-1, keepdim=True)
    take = below | (tied & (tied.cumsum(-1) <= room))  # exactly k per row
    index = torch.arange(sq.shape[-1], device=sq.device)
    chosen = torch.where(take, index, index + sq.shape[-1]).topk(k, dim=-1, largest=False, sorted=True).values
    chosen_sq = sq.gather(-1, chosen)
    order = torch.sort(chosen_sq, dim=-1, stable=True).indices
    return chosen.gather(-1, order), chosen_sq.gather(-1, order)
