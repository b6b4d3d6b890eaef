"""Exact k-nearest-neighbour search between point sets, with a fixed tie rule.

Replaces the original's pykeops ``knn_keops``. Conventions (docs/reproducibility.md): positions are
taken as float32; squared Euclidean distances are computed exactly in float64; the neighbours
are the first k of a stable ascending order, so exact ties go to the lower database index;
results are nearest first; distances are ``sqrt`` of the squared distance, in float32; no
gradient. Queries are processed in chunks so memory stays bounded for any number of queries.

``knn`` runs as the custom op ``clusten::knn`` (one node per search in traced graphs, which is
what ``clusten.flops`` counts). Which search it uses is a process-wide setting:
``set_knn_method("brute_force")`` (or ``with knn_method("brute_force"): ...``) keeps every search
on the brute force, the original's way; ``auto`` (default) sends a 2-D search to the grid search
when that is cheaper on its device (``grid_search_pays``). The default is read once, at import,
from ``CLUSTEN_KNN``.
"""
import torch
from torch import Tensor

from .backends import Setting
from .knn_grid import grid_knn
from .reference import k_smallest, query_chunks
from .validation import check

# query x database pairs per chunk: on CPU a few MB of temporaries (stays in cache); on a GPU
# fewer, larger launches (about 0.5 GB of temporaries).
CHUNK_PAIRS_CPU = 1 << 18
CHUNK_PAIRS_GPU = 1 << 24
# Measured cost (seconds) of the two exact searches per device type: brute force per query x
# database pair; the grid search (clusten.grid_knn, same results) per query and per call.
# CPU (AFF-Tiny's searches at 512 x 512, one thread): brute force ~20 ns per pair, the grid
# search ~5-6 us per query, so the grid pays once the database has more than ~300 points
# (e.g. 256 decoder queries over the 16384 stride-4 pixels: 86 ms brute force, 2.8 ms grid;
# 16384 pixels over 256 tokens: 86 ms brute force, 76-100 ms grid; 4096 tokens over 512
# cluster means: 46-56 ms brute force, 19 ms grid).
SEARCH_COST = {"cpu": {"pair": 20e-9, "query": 6e-6, "call": 1.5e-3}}
# devices without a measured cost: 2-D searches with more pairs than this go to the grid search
GRID_SEARCH_PAIRS = 1 << 22
SEARCH_ENV = "CLUSTEN_KNN"
METHOD = Setting("knn method", ("auto", "brute_force"), SEARCH_ENV)


def get_knn_method():
    """The current search method of ``knn``: ``"auto"`` or ``"brute_force"``."""
    return METHOD.value


def set_knn_method(name):
    """Set the search method of every later ``knn`` call in this process."""
    METHOD.set(name)


def knn_method(name):
    """Context manager: run a block with knn search method ``name``, then restore the previous one."""
    return METHOD.use(name)


def _check(query, database, k):
    s = check("knn", [("query", query, "b n d", "float"), ("database", database, "b n_ d", "float")])
    if not isinstance(k, (int, torch.SymInt)) or not 1 <= k <= s["n_"]:
        raise ValueError(f"knn: k must be an int in [1, n_={s['n_']}] (database size), got {k!r}")
    return s


@torch.no_grad()
def knn(query, database, k, return_dist=False):
    """The k nearest database points of every query point.

    Args:
        query: ``b x n x d`` positions (d = 2 for AFF's token positions).
        database: ``b x n_ x d`` positions, same device.
        k: number of neighbours, ``1 <= k <= n_``.
        return_dist: also return the distances.
    Returns:
        ``b x n x k`` int64 database indices, nearest first (ties: lower index first), and, if
        ``return_dist``, the ``b x n x k`` float32 Euclidean distances.

    2-D searches use the exact grid search (``clusten.grid_knn``) where it is cheaper
    (``grid_search_pays``), the others ``brute_force_knn``; both give identical results
    (``set_knn_method("brute_force")`` forces the latter).
    """
    _check(query, database, k)
    if torch.compiler.is_exporting():
        # the grid search sizes its rounds on the host: not inside an exported graph (under
        # torch.compile the op stays one opaque node that runs eagerly)
        return brute_force_knn(query, database, k, return_dist)
    idx, dist = _knn_op(query, database, k)
    return (idx, dist) if return_dist else idx


@torch.library.custom_op("clusten::knn", mutates_args=())
def _knn_op(query: Tensor, database: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(``b x n x k`` int64 indices, ``b x n x k`` float32 distances) of ``knn``."""
    b, n, d = query.shape
    if d == 2 and METHOD.value == "auto" and grid_search_pays(b * n, database.shape[1], query.device):
        return grid_knn(query, database, k, return_dist=True)
    return brute_force_knn(query, database, k, return_dist=True)


def grid_search_pays(queries, n_db, device):
    """True when the grid search of ``queries`` points (all images) over databases of ``n_db``
    points is expected to be faster than the brute force on ``device`` (``SEARCH_COST``)."""
    cost = SEARCH_COST.get(device.type)
    if cost is None:
        return queries * n_db > GRID_SEARCH_PAIRS
    return queries * n_db * cost["pair"] > queries * cost["query"] + cost["call"]


@_knn_op.register_fake
def _(query, database, k):
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape, dtype=torch.int64), query.new_empty(shape, dtype=torch.float32)


@torch.no_grad()
def brute_force_knn(query, database, k, return_dist=False):
    """``knn`` by chunked brute force over all pairs (the reference; any dimension d)."""
    s = _check(query, database, k)
    b, n, n_db = s["b"], s["n"], s["n_"]
    # float32 positions, float64 arithmetic, one b x d x n row per axis (unit stride).
    q = query.detach().float().double().transpose(1, 2).contiguous()
    db = database.detach().float().double().transpose(1, 2).contiguous()
    pairs = CHUNK_PAIRS_CPU if query.device.type == "cpu" else CHUNK_PAIRS_GPU
    idx, dist = [], []  # concatenated, not written into buffers: functional (export)
    for start, end in query_chunks(n, b * n_db, pairs):
        sq = _squared_distances(q[:, :, start:end], db)
        chunk_idx, chunk_sq = k_smallest(sq, k)
        idx.append(chunk_idx)
        if return_dist:
            dist.append(chunk_sq.sqrt().float())
    idx = torch.cat(idx, dim=1)
    return (idx, torch.cat(dist, dim=1)) if return_dist else idx


def _squared_distances(q, db):
    """``b x d x n``, ``b x d x n_`` (float64) -> ``b x n x n_`` squared distances, summed per axis."""
    diff = q[:, 0, :, None] - db[:, 0, None, :]
    sq = diff * diff
    for axis in range(1, q.shape[1]):
        diff = q[:, axis, :, None] - db[:, axis, None, :]
        sq = torch.addcmul(sq, diff, diff)
    return sq
