"""Time and peak memory of the clusten ops at AFF-Tiny shapes, per backend.

    python -m clusten.benchmark --device cuda --dtype bfloat16 --json ops.json
    python -m clusten.benchmark --device cuda --sweep        # also time Triton tile sizes
    python -m clusten.benchmark --device cpu --small          # smoke run (numbers indicative only)
    python -m clusten.benchmark --device cuda --ops knn --knn-size 4096 4096   # KNN at 1M queries

Shape sets (AFF-Tiny: stage 1, 2 heads of 32 channels, 48 neighbours = 6 clusters of 8):
``512x512 b8`` (ADE20K crop) and ``1024x2048 b1`` (Cityscapes); ``--small``: ``64x64 b1``.
For each op, forward and forward + backward, on every backend that can run on the device
(``torch``; ``cuda`` on CUDA devices):

- ``clusten_qk``, ``clusten_av`` (stage-1 attention), ``clusten_wf`` (PointConv on res2, 9
  neighbours, 4 inner channels, 256 channels), ``weighted_gather`` (FPN upsampling res3 -> res2),
  ``msdetrpc`` (pixel-decoder deformable attention: 8 heads, 3 levels x 4 points, 4 nearest);
- ``original attention``: the original's local attention, op for op: its relative-position bias
  as ``Linear(5, h)`` over the whole offset table and a gather, then the unfused chain
  (:func:`clusten.cluster_attention_reference`);
- ``reference attention`` (the chain with the bias given per neighbour, as the model's unfused
  path runs) and ``fused attention`` (:func:`clusten.cluster_attention`);
- ``knn`` (forward only): every stride-4 pixel against the stage-2 tokens, k = 4, brute force
  against the grid search (the table says whether they agree); ``--knn-size H W`` adds the search
  of an H x W image (4096 x 4096: 1,048,576 queries against 262,144 tokens).

Timing: after a warm-up call (which also builds the kernels), CUDA events around each call on
a GPU, ``torch.utils.benchmark.Timer`` on the CPU; the median in milliseconds. Peak memory
(CUDA only): the most allocated above the start, forward + backward.
"""
import argparse
import json

import torch
import torch.utils.benchmark

from . import backends
from .attention import cluster_attention
from .knn_grid import grid_knn
from .knn_search import brute_force_knn
from .ops import cluster_attention_reference, clusten_av, clusten_qk, clusten_wf, msdetrpc, weighted_gather

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEADS, HEAD_DIM = 2, 32  # AFF-Tiny stage 1
CLUSTER_SIZE, NEIGHBOUR_CLUSTERS = 8, 6  # M = 48
TABLE_WIDTH = 2 * (2048 // 4 - 1) + 1  # the original's table of offsets up to 2048 px


def shape_sets(small):
    """(name, image height, image width, batch) to benchmark."""
    if small:
        return [("64x64 b1", 64, 64, 1)]
    return [("512x512 b8", 512, 512, 8), ("1024x2048 b1", 1024, 2048, 1)]


def neighbourhoods(b, n, device):
    """AFF-like ``b x n x 48`` indices: the members of the 6 clusters of 8 tokens around each token's own."""
    clusters = max(1, n // CLUSTER_SIZE)
    own = torch.arange(n, device=device) // CLUSTER_SIZE
    first = (own - NEIGHBOUR_CLUSTERS // 2).clamp(0, max(0, clusters - NEIGHBOUR_CLUSTERS))
    cluster = first[:, None] + torch.arange(min(NEIGHBOUR_CLUSTERS, clusters), device=device)
    idx = cluster[:, :, None] * CLUSTER_SIZE + torch.arange(CLUSTER_SIZE, device=device)
    return idx.reshape(1, n, -1).clamp(max=n - 1).expand(b, -1, -1).contiguous()


def original_attention(q, k, v, nbhd_idx, pe_idx, mask, table, pe_weight, pe_bias, blank_k, blank_v):
    """The original's local attention: the bias from ``Linear(5, h)`` over the whole offset table
    (every block, every forward), gathered per neighbour, then the unfused chain."""
    b, h, n, _ = q.shape
    m = nbhd_idx.shape[-1]
    pos_embed = torch.nn.functional.linear(table, pe_weight, pe_bias)  # (T*T) x h
    bias = pos_embed[pe_idx.reshape(-1)].reshape(b, n, m, h).permute(0, 3, 1, 2)
    return cluster_attention_reference(q, k, v, nbhd_idx, bias, mask, blank_k, blank_v)


def op_cases(height, width, batch, device, dtype, seed=0):
    """name -> (function, inputs) at one shape set; floating inputs require gradients."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, c = batch, HEADS, HEAD_DIM
    n1 = (height // 4) * (width // 4)
    n2 = n1 // 4
    nd = n2 + n2 // 4 + n2 // 16  # pixel-decoder tokens: res3 + res4 + res5

    def rand(*shape, scale=1.0):
        x = torch.randn(*shape, device=device, generator=g) * scale
        return x.to(dtype).requires_grad_()

    def index(n_src, *shape):
        return torch.randint(0, n_src, shape, device=device, generator=g)

    idx = neighbourhoods(b, n1, device)
    m = idx.shape[-1]
    mask = torch.rand(b, n1, m, device=device, generator=g) > 0.1
    attention = dict(query=rand(b, h, n1, c, scale=c ** -0.5), key=rand(b, h, n1, c), value=rand(b, h, n1, c),
                     nbhd_idx=idx, bias=rand(b, h, n1, m), mask=mask, blank_k=rand(h, c), blank_v=rand(h, c))
    original = dict(attention, pe_idx=index(TABLE_WIDTH ** 2, b, n1, m), table=torch.randn(
        TABLE_WIDTH ** 2, 5, device=device, generator=g).to(dtype), pe_weight=rand(h, 5), pe_bias=rand(h))
    original["q"], original["k"], original["v"] = original.pop("query"), original.pop("key"), original.pop("value")
    del original["bias"]
    return {
        "clusten_qk": (clusten_qk, dict(query=attention["query"], key=attention["key"], nbhd_idx=idx)),
        "clusten_av": (clusten_av, dict(attn=rand(b, h, n1, m), value=attention["value"], nbhd_idx=idx)),
        "clusten_wf": (clusten_wf, dict(weights=rand(b, n1, 9, 4), feat=rand(b, n1, 256), nbhd_idx=index(n1, b, n1, 9))),
        "weighted_gather": (weighted_gather, dict(nbhd_idx=index(n2, b, n1, 4), weights=rand(b, n1, 4),
                                                  feat=rand(b, n2, 256))),
        "msdetrpc": (msdetrpc, dict(nn_idx=index(nd, b * 8, nd, 12, 4), nn_weight=rand(b * 8, nd, 12, 4),
                                    attn=rand(b * 8, nd, 12), value=rand(b * 8, nd, 32))),
        "original attention": (original_attention, original),
        "reference attention": (cluster_attention_reference, attention),
        "fused attention": (cluster_attention, attention),
    }


def knn_case(height, width, batch, device, seed=0):
    """Every stride-4 pixel (``b x n1 x 2``) and a random quarter of them as tokens."""
    rows, cols = height // 4, width // 4
    pixels = torch.stack(torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy"), -1)
    pixels = pixels.reshape(1, -1, 2).float().expand(batch, -1, -1).to(device)
    keep = torch.randperm(pixels.shape[1], generator=torch.Generator().manual_seed(seed))[: pixels.shape[1] // 4]
    return pixels, pixels[:, keep.to(device)]


def time_ms(fn, device, min_run_time=0.2):
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(max(3, int(min_run_time * 50))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure(fn, inputs, device, min_run_time, backward=True):
    """(forward ms, forward + backward ms or None, peak MiB of forward + backward or None)."""
    leaves = [x for x in inputs.values() if isinstance(x, torch.Tensor) and x.requires_grad]

    def forward():
        with torch.no_grad():
            fn(**inputs)

    def train_step():
        out = fn(**inputs)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    fwd = time_ms(forward, device, min_run_time)
    if not backward:
        return fwd, None, None
    step = time_ms(train_step, device, min_run_time)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        train_step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return fwd, step, peak


def run(device, dtype, small=False, ops=(), min_run_time=0.2, knn_size=None):
    """The table rows (dicts) for every shape set, op and backend that can run on ``device``, and
    the KNN rows of a ``knn_size`` (height, width) image."""
    names = [name for name in backends.BACKENDS if name != "auto" and backends.can_run(name, device)]
    dtype_name = str(dtype).split(".")[-1]
    rows = []
    for shapes, height, width, batch in shape_sets(small):
        for op, (fn, inputs) in op_cases(height, width, batch, device, dtype).items():
            if ops and op not in ops:
                continue
            for name in names:
                with backends.backend(name):
                    try:
                        fwd, step, peak = measure(fn, inputs, device, min_run_time)
                    except torch.OutOfMemoryError:
                        fwd = step = peak = float("nan")
                        torch.cuda.empty_cache()
                rows.append(dict(shapes=shapes, op=op, backend=name, dtype=dtype_name, fwd_ms=fwd, fwd_bwd_ms=step,
                                 peak_mib=peak))
        if not ops or "knn" in ops:
            rows += knn_rows(shapes, height, width, batch, device, min_run_time)
    if knn_size:
        height, width = knn_size
        rows += knn_rows(f"{height}x{width} b1", height, width, 1, device, min_run_time)
    return rows


def knn_rows(shapes, height, width, batch, device, min_run_time):
    """Brute-force and grid KNN rows (forward only) of ``knn_case``, with whether they agree."""
    pixels, tokens = knn_case(height, width, batch, device)
    same = torch.equal(brute_force_knn(pixels, tokens, 4), grid_knn(pixels, tokens, 4))
    rows = []
    for search, fn in (("brute force", brute_force_knn), ("grid", grid_knn)):
        fwd, _, _ = measure(lambda **a: fn(pixels, tokens, 4), {}, device, min_run_time, backward=False)
        rows.append(dict(shapes=shapes, op=f"knn ({search})", backend="torch", dtype="float32", fwd_ms=fwd,
                         fwd_bwd_ms=None, peak_mib=None, identical=same))
    return rows


def format_table(rows):
    def num(x):
        return "-" if x is None else f"{x:.3f}"

    header = f"{'shapes':<14}{'op':<21}{'backend':<9}{'dtype':<10}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        note = f"  identical: {r['identical']}" if "identical" in r else ""
        lines.append(f"{r['shapes']:<14}{r['op']:<21}{r['backend']:<9}{r['dtype']:<10}{num(r['fwd_ms']):>10}"
                     f"{num(r['fwd_bwd_ms']):>12}{num(r['peak_mib']):>10}{note}")
    return "\n".join(lines)


def sweep_tiles(device, dtype, min_run_time):
    """Forward and backward time of the Triton kernels per tile configuration (stage 1, 512x512 b8)."""
    from . import attention_triton as kernels

    inputs = op_cases(512, 512, 8, device, dtype)["fused attention"][1]
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out, lse = kernels.forward(**inputs)
    grad = torch.randn_like(out)
    saved = dict(kernels.FORWARD_CONFIG), dict(kernels.BACKWARD_CONFIG)
    print(f"\ntile sweep, stage 1 of 512x512 b8, {dtype}")
    for block_q, block_m, warps in [(8, 16, 4), (16, 16, 4), (16, 16, 8), (32, 16, 8), (8, 8, 4), (16, 8, 4),
                                    (16, 8, 8), (32, 8, 8), (64, 8, 8)]:
        config = dict(BLOCK_Q=block_q, BLOCK_M=block_m, num_warps=warps)
        kernels.FORWARD_CONFIG.update(config)
        kernels.BACKWARD_CONFIG.update(config)
        fwd = time_ms(lambda: kernels.forward(**inputs), device, min_run_time)
        bwd = time_ms(lambda: kernels.backward(grad, *inputs.values(), out, lse), device, min_run_time)
        print(f"BLOCK_Q={block_q:>3} BLOCK_M={block_m:>3} warps={warps}: forward {fwd:8.3f} ms, backward {bwd:8.3f} ms")
    kernels.FORWARD_CONFIG.update(saved[0])
    kernels.BACKWARD_CONFIG.update(saved[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--small", action="store_true", help="64x64 batch 1 instead of the AFF-Tiny shape sets")
    parser.add_argument("--ops", nargs="*", default=[], help="subset of the ops (names as in the table; 'knn')")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timed calls per measurement")
    parser.add_argument("--knn-size", type=int, nargs=2, metavar=("H", "W"),
                        help="also time the KNN search of an H x W image (4096 4096: 1M queries)")
    parser.add_argument("--sweep", action="store_true", help="also time Triton tile configurations (CUDA)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(device, DTYPES[args.dtype], args.small, args.ops, args.min_run_time, args.knn_size)
    print(format_table(rows))
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    torch=torch.__version__, threads=torch.get_num_threads())
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.sweep:
        sweep_tiles(device, DTYPES[args.dtype], args.min_run_time)
    return rows


if __name__ == "__main__":
    main()
