"""Benchmark of the fused cluster attention against the unfused chain, and of grid_knn against knn.

    python -m clusten.benchmark --device cuda --dtype bf16            # AFF-Tiny, ADE 512 x 512, batch 8
    python -m clusten.benchmark --device cuda --sweep                 # also try Triton tile sizes
    python -m clusten.benchmark --device cpu --small                  # smoke test (numbers indicative only)

Attention: every stage of AFF-Tiny (c' = 32, M = 48) at the given canvas and batch, forward and
forward + backward, milliseconds and peak memory, for
- ``unfused``: the original's chain (clusten_qk, + bias, + mask, blank logit, cat, softmax,
  clusten_av, + blank value), i.e. the clusten ops as the original calls them;
- ``fused``: :func:`clusten.cluster_attention`.
KNN: ``--knn-queries`` query points on a square canvas against a quarter-density token subset,
for k = 2, 4, 6, 9, brute force (:func:`clusten.brute_force_knn`) against :func:`clusten.grid_knn`.
"""
import argparse
import math
import time

import torch

from .knn_search import brute_force_knn
from .ops import clusten_av, clusten_qk
from . import attention
from .knn_grid import grid_knn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_HEADS = (2, 4, 8, 16)  # AFF-Tiny heads per stage, c' = 32
CLUSTER_SIZE, NEIGHBOUR_CLUSTERS = 8, 6  # M = 48


def unfused_attention(query, key, value, nbhd_idx, bias, mask, blank_k, blank_v):
    """The original's sequence of ops (spec section 3.3), each a separate pass."""
    b, h, n, c = query.shape
    attn = clusten_qk(query, key, nbhd_idx) + bias
    if mask is not None:
        attn = attn + (1 - mask).unsqueeze(1) * attention.MASK_LOGIT
    blank = (query * blank_k.view(1, h, 1, c)).sum(-1, keepdim=True)
    attn = torch.cat([attn, blank], -1).softmax(-1)
    return clusten_av(attn[..., :-1], value, nbhd_idx) + attn[..., -1:] * blank_v.view(1, h, 1, c)


def neighbourhoods(b, n, device):
    """AFF-like ``b x n x 48`` indices: the members of the 6 clusters of 8 tokens around each token's own."""
    clusters = max(1, n // CLUSTER_SIZE)
    own = torch.arange(n, device=device) // CLUSTER_SIZE
    first = (own - NEIGHBOUR_CLUSTERS // 2).clamp(0, max(0, clusters - NEIGHBOUR_CLUSTERS))
    cluster = first[:, None] + torch.arange(min(NEIGHBOUR_CLUSTERS, clusters), device=device)
    idx = cluster[:, :, None] * CLUSTER_SIZE + torch.arange(CLUSTER_SIZE, device=device)
    return idx.reshape(1, n, -1).clamp(max=n - 1).expand(b, -1, -1).contiguous()


def attention_inputs(b, n, heads, c, dtype, device, requires_grad):
    idx = neighbourhoods(b, n, device)
    m = idx.shape[-1]

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(requires_grad)

    return dict(query=leaf(b, heads, n, c, scale=c ** -0.5), key=leaf(b, heads, n, c), value=leaf(b, heads, n, c),
                nbhd_idx=idx, bias=leaf(b, heads, n, m), mask=None, blank_k=leaf(heads, c), blank_v=leaf(heads, c))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat):
    """(median milliseconds, peak bytes allocated above the start) of ``fn()``."""
    fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def bench_attention(args, device):
    dtype = DTYPES[args.dtype]
    rows = []
    side = args.canvas // 4
    for stage, heads in enumerate(TINY_HEADS):
        n = side * side // 4 ** stage
        for name, fn in (("unfused", unfused_attention), ("fused", attention.cluster_attention)):
            inputs = attention_inputs(args.batch, n, heads, 32, dtype, device, requires_grad=True)
            grad = torch.randn_like(inputs["query"])

            def forward():
                with torch.no_grad():
                    fn(**inputs)

            def train_step():
                fn(**inputs).backward(grad)

            fwd_ms, fwd_peak = timed(forward, device, args.repeat)
            step_ms, step_peak = timed(train_step, device, args.repeat)
            rows.append((stage, n, heads, name, fwd_ms, step_ms, step_peak))
        with torch.no_grad():
            inputs = attention_inputs(args.batch, n, heads, 32, dtype, device, requires_grad=False)
            diff = (unfused_attention(**inputs).float() - attention.cluster_attention(**inputs).float()).abs().max()
        print(f"stage {stage + 1}: n={n} h={heads} max |fused - unfused| = {diff.item():.2e}")
    print(f"\nattention, AFF-Tiny, canvas {args.canvas}, batch {args.batch}, {args.dtype}, {device}")
    print(f"{'stage':>5} {'n':>7} {'h':>3} {'path':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'step peak MiB':>14}")
    for stage, n, heads, name, fwd_ms, step_ms, peak in rows:
        print(f"{stage + 1:>5} {n:>7} {heads:>3} {name:>8} {fwd_ms:>9.3f} {step_ms:>11.3f} {peak / 2 ** 20:>14.1f}")
    for stage in range(len(TINY_HEADS)):
        unf, fus = [r for r in rows if r[0] == stage]
        print(f"stage {stage + 1}: forward x{unf[4] / fus[4]:.2f}, fwd+bwd x{unf[5] / fus[5]:.2f}, "
              f"peak memory {fus[6] / unf[6] if unf[6] else float('nan'):.2f} of unfused")


def bench_knn(args, device):
    side = int(math.isqrt(args.knn_queries))
    ys, xs = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    pixels = torch.stack([xs, ys], -1).reshape(1, -1, 2).float()
    tokens = pixels[:, torch.randperm(pixels.shape[1], device=device)[: pixels.shape[1] // 4]]
    print(f"\nknn: {pixels.shape[1]} queries (canvas {side}^2) -> {tokens.shape[1]} tokens, {device}")
    for k in (2, 4, 6, 9):
        brute_ms, _ = timed(lambda: brute_force_knn(pixels, tokens, k), device, args.repeat)
        grid_ms, _ = timed(lambda: grid_knn(pixels, tokens, k), device, args.repeat)
        same = torch.equal(brute_force_knn(pixels, tokens, k), grid_knn(pixels, tokens, k))
        print(f"k={k}: brute force {brute_ms:9.2f} ms, grid {grid_ms:8.2f} ms, x{brute_ms / grid_ms:.1f}, "
              f"identical: {same}")


def sweep_tiles(args, device):
    """Forward and backward time of the Triton kernels per tile configuration (CUDA only)."""
    kernels = attention._kernels()
    n, heads = (args.canvas // 4) ** 2, TINY_HEADS[0]
    inputs = attention_inputs(args.batch, n, heads, 32, DTYPES[args.dtype], device, requires_grad=False)
    out, lse = kernels.forward(**inputs)
    grad = torch.randn_like(out)
    saved = dict(kernels.FORWARD_CONFIG), dict(kernels.BACKWARD_CONFIG)
    print(f"\ntile sweep, stage 1 (n={n}, h={heads}), {args.dtype}")
    for block_q, block_m, warps in [(8, 16, 4), (16, 16, 4), (16, 16, 8), (32, 16, 8), (8, 8, 4), (16, 8, 4),
                                    (16, 8, 8), (32, 8, 8), (64, 8, 8)]:
        config = dict(BLOCK_Q=block_q, BLOCK_M=block_m, num_warps=warps)
        kernels.FORWARD_CONFIG.update(config)
        kernels.BACKWARD_CONFIG.update(config)
        fwd_ms, _ = timed(lambda: kernels.forward(**inputs), device, args.repeat)
        bwd_ms, _ = timed(lambda: kernels.backward(grad, *inputs.values(), out, lse), device, args.repeat)
        print(f"BLOCK_Q={block_q:>3} BLOCK_M={block_m:>3} warps={warps}: "
              f"forward {fwd_ms:8.3f} ms, backward {bwd_ms:8.3f} ms")
    kernels.FORWARD_CONFIG.update(saved[0])
    kernels.BACKWARD_CONFIG.update(saved[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--canvas", type=int, default=512, help="input side in pixels (tokens: (canvas/4)^2)")
    parser.add_argument("--knn-queries", type=int, default=1 << 20)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
    parser.add_argument("--sweep", action="store_true", help="also time Triton tile configurations")
    parser.add_argument("--skip-knn", action="store_true")
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.canvas, args.knn_queries, args.repeat = 1, 64, 64 * 64, 2
    device = torch.device(args.device)
    bench_attention(args, device)
    if not args.skip_knn:
        bench_knn(args, device)
    if args.sweep:
        sweep_tiles(args, device)


if __name__ == "__main__":
    main()
