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
from ``CLUSTEN_KNN``. While exporting (``torch.export``, symbolic sizes) the brute force runs as a
``scan`` over fixed-size query chunks, and a search over a whole pixel grid (``grid_hw``) as
``pixel_grid_knn``: bounded memory, no host synchronisation, the same results.
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
# queries per step when the sizes are symbolic (torch.export): the steps are a ``scan`` over
# fixed-size chunks, so an exported search keeps ``SCAN_QUERIES x n_`` pairs alive, not ``n x n_``
SCAN_QUERIES = 256
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
def knn(query, database, k, return_dist=False, grid_hw=None):
    """The k nearest database points of every query point.

    Args:
        query: ``b x n x d`` positions (d = 2 for AFF's token positions).
        database: ``b x n_ x d`` positions, same device.
        k: number of neighbours, ``1 <= k <= n_``.
        return_dist: also return the distances.
        grid_hw: ``(h, w)`` when the database is every pixel of an ``h x w`` grid, each once, and
            the queries lie within it: an exported graph (``torch.export``) then searches only a
            window around each query (``pixel_grid_knn``) instead of the whole database.
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
        if grid_hw is not None and k <= WINDOW_K:
            return pixel_grid_knn(query, database, grid_hw, k, return_dist)
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
    if not isinstance(n * n_db, int):
        idx, sq = _scanned_search(q, db, k)
        return (idx, sq.sqrt().float()) if return_dist else idx
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


def _scanned_search(q, db, k):
    """``k_smallest`` of ``b x d x n`` queries over ``b x d x n_`` (float64) for symbolic sizes:
    a ``scan`` (ONNX ``Scan``) over ``n // SCAN_QUERIES + 2`` chunks of ``SCAN_QUERIES`` queries
    (at least two: a single one would be specialised as a broadcast); chunk rows past the last
    query repeat it and are dropped. The sizes are written without remainders, which the
    exporter could not prove the guards of. Returns ``b x n x k`` indices and squared distances."""
    from torch._higher_order_ops.scan import scan

    b, _, n = q.shape
    rows = torch.arange(SCAN_QUERIES, device=q.device)
    starts = torch.arange(n // SCAN_QUERIES + 2, device=q.device) * SCAN_QUERIES

    def step(database, start):  # the database rides along as the unchanged carry
        chunk = q.index_select(2, (start + rows).clamp(max=n - 1))
        return database.clone(), k_smallest(_squared_distances(chunk, database), k)

    _, (idx, sq) = scan(step, db, starts)  # chunks x b x SCAN_QUERIES x k
    # query j is row j of the chunks laid end to end
    where = torch.arange(n, device=q.device).view(1, n, 1).expand(b, n, k)

    def unchunk(t):
        return t.permute(1, 0, 2, 3).reshape(b, -1, k).gather(1, where)

    return unchunk(idx), unchunk(sq)


# pixel_grid_knn: a (2 * WINDOW_RADIUS + 1)^2 window holds the WINDOW_K nearest pixels of any
# point of the grid: 9 pixels lie within sqrt(8) of it (a 3 x 3 block), every pixel outside the
# window at least WINDOW_RADIUS + 0.5 = 3.5 away
WINDOW_RADIUS = 3
WINDOW_K = 9


@torch.no_grad()
def pixel_grid_knn(query, pixels, grid_hw, k, return_dist=False):
    """``knn`` when the database is a whole pixel grid: each query's candidates are the pixels of
    a fixed window around it, so the cost and memory are ``n x 49``, without host
    synchronisation or data-dependent shapes (``torch.export``). Same results as ``knn``.

    Args:
        query: ``b x n x 2`` positions (x, y) within ``[0, w-1] x [0, h-1]``.
        pixels: ``b x (h*w) x 2`` the integer (x, y) of every pixel of the ``h x w`` grid, each
            once, in any order (the database; its order decides ties).
        grid_hw: (h, w), each at least ``2 * WINDOW_RADIUS + 1`` (smaller grids: brute force).
        k: ``1 <= k <= WINDOW_K``; return_dist: as ``knn``.
    """
    s = _check(query, pixels, k)
    h, w = grid_hw
    size = 2 * WINDOW_RADIUS + 1
    if s["d"] != 2 or k > WINDOW_K or h * w != s["n_"]:
        raise ValueError(f"pixel_grid_knn: needs 2-D points, k <= {WINDOW_K} and h * w = {s['n_']} database "
                         f"points, got d={s['d']}, k={k}, grid {h} x {w}")
    if h < size or w < size:
        return brute_force_knn(query, pixels, k, return_dist)
    b, n = s["b"], s["n"]
    q = query.detach().float()
    pixel = pixels[..., 1].long() * w + pixels[..., 0].long()  # b x hw
    if not torch.compiler.is_exporting():  # the premises (an exported graph cannot check them)
        if (q < 0).any() or (q[..., 0] > w - 1).any() or (q[..., 1] > h - 1).any():
            raise ValueError(f"pixel_grid_knn: queries must lie within the {h} x {w} grid")
        if not torch.equal(pixel.sort(dim=1).values, torch.arange(h * w, device=pixel.device).expand(b, -1)):
            raise ValueError(f"pixel_grid_knn: the database must hold every pixel of the {h} x {w} grid once")
    owner = torch.zeros_like(pixel).scatter(1, pixel, torch.arange(h * w, device=pixel.device).expand(b, -1))
    # window centres, clamped so that the window stays inside the grid
    offset = torch.arange(-WINDOW_RADIUS, WINDOW_RADIUS + 1, device=q.device)
    cx = q[..., 0].round().long().clamp(WINDOW_RADIUS, w - 1 - WINDOW_RADIUS)
    cy = q[..., 1].round().long().clamp(WINDOW_RADIUS, h - 1 - WINDOW_RADIUS)
    cell = (cy[..., None, None] + offset[:, None]) * w + cx[..., None, None] + offset  # b x n x size x size
    cand = owner.gather(1, cell.reshape(b, -1)).view(b, n, size * size)
    cand = torch.sort(cand, dim=-1, stable=True).values  # ascending database index: ties to the lower one
    # float64 squared distances with the operations of _squared_distances (identical values)
    cand_pos = pixels.detach().float().double().gather(1, cand.view(b, -1, 1).expand(-1, -1, 2)).view(b, n, -1, 2)
    qd = q.double()
    diff = qd[..., None, 0] - cand_pos[..., 0]
    sq = diff * diff
    diff = qd[..., None, 1] - cand_pos[..., 1]
    sq = torch.addcmul(sq, diff, diff)
    local, sq = k_smallest(sq, k)
    idx = cand.gather(-1, local)
    return (idx, sq.sqrt().float()) if return_dist else idx


def _squared_distances(q, db):
    """``b x d x n``, ``b x d x n_`` (float64) -> ``b x n x n_`` squared distances, summed per axis."""
    diff = q[:, 0, :, None] - db[:, 0, None, :]
    sq = diff * diff
    for axis in range(1, q.shape[1]):
        diff = q[:, axis, :, None] - db[:, axis, None, :]
        sq = torch.addcmul(sq, diff, diff)
    return sq
