#!/usr/bin/env python
"""Time and peak memory of the clusten ops at AFF-Tiny shapes.

For every op it measures the forward and the backward pass of the PyTorch twin
(``CLUSTEN_BACKEND=torch``) and, on CUDA, of the compiled kernels; and the same for a faithful
re-creation of the original's unfused local-attention chain (QK, relative-position bias from
``Linear(5, h)`` over the whole table and a gather, cluster mask, blank token, softmax, AV).

Shape sets (AFF-Tiny, 48 neighbours, head dim 32): ``512x512`` batch 8 (ADE20K crop) and
``1024x2048`` batch 1 (Cityscapes); ``--small`` uses a 64x64 batch-1 image instead, for a quick
smoke run on CPU.

    python tools/benchmark_ops.py --device cuda --dtype float16 --json bench.json
    python tools/benchmark_ops.py --device cpu --small
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clusten  # noqa: E402
from clusten import build  # noqa: E402

REL_POS_WIDTH = 511  # the original's 2048//4 - 1
TABLE_WIDTH = 2 * REL_POS_WIDTH + 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shape_sets(small):
    """(name, image height, image width, batch) to benchmark."""
    if small:
        return [("64x64 b1", 64, 64, 1)]
    return [("512x512 b8", 512, 512, 8), ("1024x2048 b1", 1024, 2048, 1)]


def tiny_sizes(height, width, batch):
    """Token counts and op sizes of AFF-Tiny for one input (ds_rate 0.25 per merge)."""
    n1 = (height // 4) * (width // 4)
    n2, n3, n4 = n1 // 4, n1 // 16, n1 // 64
    return {
        "b": batch, "grid": (height // 4, width // 4), "n1": n1, "n2": n2, "heads": 2, "head_dim": 32,
        "nbhd": min(48, n1),
        "decoder_tokens": n2 + n3 + n4,  # res3 + res4 + res5
    }


def _rand(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype).requires_grad_()


def _index(n_src, *shape, device):
    return torch.randint(0, n_src, shape, device=device)


def op_cases(s, device, dtype):
    """name -> (function, argument builder) at the sizes ``s``."""
    b, n1, n2, h, c, m = s["b"], s["n1"], s["n2"], s["heads"], s["head_dim"], s["nbhd"]
    nd = s["decoder_tokens"]
    f = dict(device=device, dtype=dtype)
    return {
        # stage-1 local attention
        "clusten_qk": (clusten.clusten_qk, lambda: (_rand(b, h, n1, c, **f), _rand(b, h, n1, c, **f),
                                                    _index(n1, b, n1, m, device=device))),
        "clusten_av": (clusten.clusten_av, lambda: (_rand(b, h, n1, m, **f), _rand(b, h, n1, c, **f),
                                                    _index(n1, b, n1, m, device=device))),
        # PointConv on res2 (9 neighbours, inner_ch 4, 256 channels)
        "clusten_wf": (clusten.clusten_wf, lambda: (_rand(b, n1, 9, 4, **f), _rand(b, n1, 256, **f),
                                                    _index(n1, b, n1, 9, device=device))),
        # FPN upsample res3 -> res2 (4 neighbours, 256 channels)
        "weighted_gather": (clusten.weighted_gather, lambda: (_index(n2, b, n1, 4, device=device),
                                                              _rand(b, n1, 4, **f), _rand(b, n2, 256, **f))),
        # pixel-decoder deformable attention: b*8 heads, 3 levels x 4 points, 4 nearest tokens
        "msdetrpc": (clusten.msdetrpc, lambda: (_index(nd, b * 8, nd, 12, 4, device=device),
                                                _rand(b * 8, nd, 12, 4, **f), _rand(b * 8, nd, 12, **f),
                                                _rand(b * 8, nd, 32, **f))),
        "attention_chain": (original_attention_chain, lambda: chain_inputs(s, device, dtype)),
        # the same attention through the fused op (bias given per neighbour, as the backbone does)
        "fused_attention": (clusten.cluster_attention, lambda: fused_inputs(s, device, dtype)),
    }


def fused_inputs(s, device, dtype):
    b, n, h, c, m = s["b"], s["n1"], s["heads"], s["head_dim"], s["nbhd"]
    f = dict(device=device, dtype=dtype)
    return (
        _rand(b, h, n, c, **f), _rand(b, h, n, c, **f), _rand(b, h, n, c, **f),
        _index(n, b, n, m, device=device),
        _rand(b, h, n, m, **f),  # relative-position bias
        (torch.rand(b, n, m, device=device) > 0.1).to(dtype),  # cluster mask
        _rand(h, c, **f), _rand(h, c, **f),  # blank_k, blank_v
    )


def chain_inputs(s, device, dtype):
    b, n, h, c, m = s["b"], s["n1"], s["heads"], s["head_dim"], s["nbhd"]
    f = dict(device=device, dtype=dtype)
    return (
        _rand(b, h, n, c, **f), _rand(b, h, n, c, **f), _rand(b, h, n, c, **f),
        _index(n, b, n, m, device=device),
        _index(TABLE_WIDTH * TABLE_WIDTH, b, n, m, device=device),  # pe_idx
        (torch.rand(b, n, m, device=device) > 0.1).to(dtype),  # cluster mask
        torch.randn(TABLE_WIDTH * TABLE_WIDTH, 5, **f),  # pre_table (a constant in the original)
        _rand(h, 5, **f), _rand(h, **f),  # pos_embed Linear(5, h)
        _rand(h * c, **f), _rand(h * c, **f),  # blank_k, blank_v
    )


def original_attention_chain(q, k, v, member_idx, pe_idx, mask, pre_table, pe_weight, pe_bias, blank_k, blank_v):
    """The original ClusterAttention core, op for op (spec section 3.3), ``b x h x n x c`` out."""
    b, h, n, c = q.shape
    m = member_idx.shape[-1]
    attn = clusten.clusten_qk(q, k, member_idx)
    pos_embed = torch.nn.functional.linear(pre_table, pe_weight, pe_bias)  # (T*T) x h, every block
    bias = pos_embed[pe_idx.reshape(-1)].reshape(b, n, m, h).permute(0, 3, 1, 2)
    attn = attn + bias
    attn = attn + (1 - mask.unsqueeze(1)) * (-100)
    blank_logit = (q * blank_k.reshape(1, h, 1, c)).sum(-1, keepdim=True)
    attn = torch.cat([attn, blank_logit], dim=-1).softmax(dim=-1)
    out = clusten.clusten_av(attn[..., :m].contiguous(), v, member_idx)
    return out + attn[..., m:] * blank_v.reshape(1, h, 1, c)


def knn_case(s, device):
    g = torch.Generator().manual_seed(0)
    rows, cols = s["grid"]
    pixels = torch.stack(torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy"), -1)
    pixels = pixels.reshape(1, -1, 2).float().expand(s["b"], -1, -1).to(device)
    tokens = pixels[:, torch.randperm(pixels.shape[1], generator=g)[: s["n2"]]]
    return pixels, tokens


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, make_args, device, repeat, backward=True):
    """Mean forward ms, mean backward ms and peak extra memory (MiB, CUDA only)."""
    args = make_args()
    grad = None
    fwd, bwd = [], []
    for it in range(repeat + 1):  # the first iteration warms up (and builds the kernels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(device)
        t1 = time.perf_counter()
        if backward:
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
            _sync(device)
        t2 = time.perf_counter()
        if it:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        for a in args:
            a.grad = None
        del out
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return 1e3 * sum(fwd) / repeat, (1e3 * sum(bwd) / repeat if backward else None), peak


@contextlib.contextmanager
def backend(name):
    previous = os.environ.get(build.BACKEND_ENV)
    os.environ[build.BACKEND_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(build.BACKEND_ENV)
        else:
            os.environ[build.BACKEND_ENV] = previous


def run(device, dtype, small, repeat, ops):
    backends = ["torch", "cuda"] if device.type == "cuda" else ["torch"]
    rows = []
    for set_name, height, width, batch in shape_sets(small):
        s = tiny_sizes(height, width, batch)
        for name, (fn, make_args) in op_cases(s, device, dtype).items():
            if ops and name not in ops:
                continue
            for impl in backends:
                with backend(impl):
                    try:
                        fwd, bwd, peak = measure(fn, make_args, device, repeat)
                    except torch.OutOfMemoryError:
                        fwd = bwd = peak = float("nan")
                        torch.cuda.empty_cache()
                rows.append(dict(shapes=set_name, op=name, impl=impl, dtype=str(dtype).split(".")[-1],
                                 fwd_ms=fwd, bwd_ms=bwd, peak_mib=peak))
        if not ops or "knn" in ops:
            pixels, tokens = knn_case(s, device)
            for impl, search in (("brute force", clusten.brute_force_knn), ("grid", clusten.grid_knn)):
                fwd, _, peak = measure(lambda: search(pixels, tokens, 4), lambda: (), device, repeat, backward=False)
                rows.append(dict(shapes=set_name, op="knn (pixels->res3, k=4)", impl=impl, dtype="float32",
                                 fwd_ms=fwd, bwd_ms=None, peak_mib=peak))
    return rows


def format_table(rows):
    def num(x):
        return "-" if x is None else f"{x:.2f}"

    header = f"{'shapes':<14}{'op':<26}{'impl':<7}{'dtype':<10}{'fwd ms':>10}{'bwd ms':>10}{'peak MiB':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['shapes']:<14}{r['op']:<26}{r['impl']:<7}{r['dtype']:<10}"
                     f"{num(r['fwd_ms']):>10}{num(r['bwd_ms']):>10}{num(r['peak_mib']):>11}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--small", action="store_true", help="64x64 batch 1 instead of the AFF-Tiny shape sets")
    parser.add_argument("--repeat", type=int, default=5, help="timed iterations after one warm-up")
    parser.add_argument("--ops", nargs="*", default=[], help="subset of ops (default: all, and knn)")
    parser.add_argument("--json", default="benchmark_ops.json", help="where to write the rows")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = run(device, DTYPES[args.dtype], args.small, args.repeat, args.ops)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, repeat=args.repeat)
    print(format_table(rows))
    with open(args.json, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
