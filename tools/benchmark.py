#!/usr/bin/env python
"""Inference and training speed of a model: the harness every speed figure of aff_seg is
quoted from.

Examples::

    python tools/benchmark.py --config-file CFG --input-size 512 512 --json speed.json
    python tools/benchmark.py --config-file CFG --dataset-images --tasks inference
    python tools/benchmark.py --config-file CFG --tasks train --batch-size 2 SOLVER.AMP.ENABLED True
    python tools/benchmark.py --config-file CFG --original-execution   # fp32, unfused, brute-force KNN
    python tools/benchmark.py --config-file CFG --tasks inference --profile   # per-op breakdown
    python tools/benchmark.py --compare CFG_A CFG_A@original CFG_B --input-size 512 512 --repeats 3
    python tools/benchmark.py --compare CFG CFG@compile --tasks inference   # eager vs torch.compile

``--compare`` times several contenders side by side: each repetition runs every contender
once, in turn, each in a fresh process (so peak memory is the contender's own and a noisy
moment of a shared machine spreads over all contenders); the table gives medians over the
repetitions, their spread (min-max) and the ratio to the first contender. ``CFG@original``
runs that config the original's way, ``CFG@compile`` with ``--compile``.

Inference: images/s, per-batch latency percentiles (p50, p90, p99) and peak memory, under
``torch.no_grad`` in eval mode.  Training: the time of one iteration (forward, backward,
AdamW step), images/s and peak memory.  Each is timed after ``--warmup`` untimed
iterations, with CUDA events on a GPU and ``time.perf_counter`` on the CPU.  Inputs are
random images of ``--input-size`` (default ``INPUT.CROP.SIZE``) with a few random masks as
training targets, or, with ``--dataset-images``, the first test/train images of the config's
datasets (loaded before the clock starts, so data loading is not timed).

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU it is the peak
resident size of the whole process so far (``ru_maxrss``), an upper bound.
"""
import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from analyze_model import build_loaded_model, fixed_size_inputs, setup_cfg  # noqa: E402
from aff_seg.data.dataset_mappers import build_train_mapper  # noqa: E402
from aff_seg.predictor import compile_for_inference  # noqa: E402
import clusten  # noqa: E402
from detectron2.data import build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

logger = logging.getLogger("aff_seg.benchmark")

PERCENTILES = (50, 90, 99)
NUM_TARGET_MASKS = 3


# -- timing -------------------------------------------------------------------------------


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(step, batches, warmup, iters, device):
    """Run ``step(batch)`` ``warmup`` times untimed, then ``iters`` times timed.

    Args:
        step: callable taking one batch.
        batches: an iterator of batches (cycled by the caller if needed).
        device: where the model runs: CUDA events there, ``perf_counter`` on the CPU.

    Returns:
        (seconds, peak_memory_mib, warmup_seconds): the duration of each timed iteration, the
        peak memory during the timed iterations (see the module docstring), and the duration of
        the warm-up (with ``--compile``: mostly the compilation).
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step(next(batches))
    _synchronize(device)
    warmup_seconds = time.perf_counter() - start
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iters):
            batch = next(batches)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(batch)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        for _ in range(iters):
            batch = next(batches)
            start = time.perf_counter()
            step(batch)
            seconds.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return seconds, peak, warmup_seconds


def summarize(seconds, images_per_iter, peak_memory_mib, warmup_seconds):
    """Throughput and latency statistics of the timed iterations."""
    ms = np.array(seconds) * 1e3
    return {
        "warmup_s": warmup_seconds,
        "iterations": len(seconds),
        "images_per_iter": images_per_iter,
        "images_per_s": images_per_iter * len(seconds) / float(np.sum(seconds)),
        "latency_ms": {
            "mean": float(ms.mean()),
            **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES},
        },
        "peak_memory_mib": float(peak_memory_mib),
    }


# -- inputs -------------------------------------------------------------------------------


def _random_targets(height, width, num_classes, generator):
    """``NUM_TARGET_MASKS`` random rectangles with random classes, as a mapper's Instances."""
    masks = torch.zeros(NUM_TARGET_MASKS, height, width, dtype=torch.bool)
    for mask in masks:
        y0, x0 = (torch.randint(0, s // 2, (1,), generator=generator).item() for s in (height, width))
        y1, x1 = y0 + height // 2, x0 + width // 2
        mask[y0:y1, x0:x1] = True
    instances = Instances((height, width))
    instances.gt_classes = torch.randint(0, num_classes, (NUM_TARGET_MASKS,), generator=generator)
    instances.gt_masks = BitMasks(masks)
    return instances


def fixed_size_batches(cfg, height, width, batch_size, with_targets):
    """An endless iterator of batches of random ``3 x height x width`` images."""
    generator = torch.Generator().manual_seed(0)
    batch = fixed_size_inputs(height, width, batch_size)
    if with_targets:
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        for item in batch:
            item["instances"] = _random_targets(height, width, num_classes, generator)
    return itertools.repeat(batch)


def dataset_batches(cfg, count, batch_size, train):
    """``count`` batches from the config's first test set (or its train set), loaded into
    memory now and then cycled endlessly."""
    if train:
        loader = build_detection_train_loader(
            cfg, mapper=build_train_mapper(cfg), total_batch_size=batch_size, num_workers=0
        )
        batches = list(itertools.islice(loader, count))
    else:
        if not len(cfg.DATASETS.TEST):
            raise ValueError("DATASETS.TEST is empty: benchmark at a fixed --input-size instead")
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
        images = list(itertools.islice(loader, count * batch_size))
        batches = [
            [item for group in images[i : i + batch_size] for item in group]
            for i in range(0, len(images), batch_size)
        ]
    if not batches:
        raise ValueError("the dataset gave no image")
    return itertools.cycle(batches)


# -- tasks --------------------------------------------------------------------------------


def benchmark_inference(model, cfg, batches, warmup, iters, batch_size):
    model.eval()
    amp_dtype = getattr(torch, cfg.SOLVER.AMP.PRECISION)

    def step(batch):
        with torch.no_grad(), torch.autocast(model.device.type, dtype=amp_dtype, enabled=cfg.SOLVER.AMP.ENABLED):
            model(batch)

    seconds, peak, warmup_seconds = time_iterations(step, batches, warmup, iters, model.device)
    return summarize(seconds, batch_size, peak, warmup_seconds)


def benchmark_training(model, cfg, batches, warmup, iters, batch_size):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    amp_dtype = getattr(torch, cfg.SOLVER.AMP.PRECISION)

    def step(batch):
        with torch.autocast(model.device.type, dtype=amp_dtype, enabled=cfg.SOLVER.AMP.ENABLED):
            losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds, peak, warmup_seconds = time_iterations(step, batches, warmup, iters, model.device)
    return summarize(seconds, batch_size, peak, warmup_seconds)


def run(cfg, tasks, input_size=None, dataset_images=False, batch_size=1, warmup=3, iters=20):
    """Benchmark the model of ``cfg``.

    Args:
        tasks: any of ``"inference"``, ``"train"``.
        input_size: (H, W) of the random images; None: ``INPUT.CROP.SIZE``.
        dataset_images: use the config's dataset images instead of random ones.

    Returns:
        dict with the environment and one ``summarize`` result per task.
    """
    if warmup < 0 or iters < 1 or batch_size < 1:
        raise ValueError(
            f"need warmup >= 0, iters >= 1, batch_size >= 1; got {warmup}, {iters}, {batch_size}"
        )
    height, width = input_size or tuple(cfg.INPUT.CROP.SIZE)
    torch.manual_seed(0)
    model = build_loaded_model(cfg)
    if cfg.TEST.COMPILE:
        if "train" in tasks:
            raise ValueError("TEST.COMPILE (--compile) compiles the inference model: use --tasks inference")
        compile_for_inference(model)  # compiled on the first warm-up iteration
    device = model.device
    result = {
        "config": {"weights": cfg.MODEL.WEIGHTS, "amp": cfg.SOLVER.AMP.ENABLED, "compile": cfg.TEST.COMPILE},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "inputs": "dataset" if dataset_images else f"random {height}x{width}",
        "batch_size": batch_size,
        "warmup": warmup,
    }
    for task in tasks:
        train = task == "train"
        if dataset_images:
            batches = dataset_batches(cfg, warmup + iters, batch_size, train)
        else:
            batches = fixed_size_batches(cfg, height, width, batch_size, with_targets=train)
        if train:
            result[task] = benchmark_training(model, cfg, batches, warmup, iters, batch_size)
        else:
            result[task] = benchmark_inference(model, cfg, batches, warmup, iters, batch_size)
    return result


@contextlib.contextmanager
def _without_gpu_probe_error():
    """Without a CUDA driver, torch.profiler's Kineto (CUDA builds of torch) writes
    "ERROR: ... gpuGetDeviceCount failed" to the process's stderr although only CPU activity is
    recorded.  Stderr (file descriptor 2) is captured for the block and given back without that
    line."""
    if torch.cuda.is_available():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines()
                    if "gpuGetDeviceCount failed" not in line]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def op_breakdown(model, cfg, batch, top=25):
    """Per-op time of one inference forward (``torch.profiler``, after one warm-up forward).

    Returns:
        list of dicts ``{op, calls, self_ms, percent}``, the ``top`` ops by self time (device
        time on a GPU, CPU time otherwise); the clusten ops appear under their custom-op names.
    """
    model.eval()
    amp_dtype = getattr(torch, cfg.SOLVER.AMP.PRECISION)
    on_gpu = model.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.no_grad(), torch.autocast(model.device.type, dtype=amp_dtype, enabled=cfg.SOLVER.AMP.ENABLED):
        model(batch)
        _synchronize(model.device)
        with _without_gpu_probe_error(), torch.profiler.profile(activities=activities) as prof:
            model(batch)
            _synchronize(model.device)
    events = prof.key_averages()
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    return [
        {"op": e.key, "calls": e.count, "self_ms": getattr(e, attr) / 1e3, "percent": 100 * getattr(e, attr) / total}
        for e in rows
    ]


def table(result, tasks):
    rows = []
    for task in tasks:
        r = result[task]
        lat = r["latency_ms"]
        rows.append(
            [task, f"{r['images_per_s']:.2f}", f"{lat['mean']:.1f}"]
            + [f"{lat[f'p{p}']:.1f}" for p in PERCENTILES]
            + [f"{r['peak_memory_mib']:.0f}", f"{r['warmup_s']:.1f}"]
        )
    headers = ["task", "img/s", "mean ms"] + [f"p{p} ms" for p in PERCENTILES] + ["peak MiB", "warm-up s"]
    return tabulate(rows, headers=headers, tablefmt="pipe")


# -- side by side ------------------------------------------------------------------------


def compare(contenders, tasks, opts, input_size=None, batch_size=1, warmup=3, iters=20, repeats=3, threads=None):
    """Interleaved repetitions of several contenders, each run in a fresh process.

    Args:
        contenders: config files, each optionally suffixed ``@original`` (run the original's way) or
            ``@compile`` (``--compile``).
        opts: config overrides applied to every contender.
        repeats: repetitions; each runs every contender once, in the given order.
        threads: ``torch.set_num_threads`` in each run (None: torch's default).
    Returns:
        dict: ``machine`` facts and, per contender, per task, the median images/s and latency
        over the repetitions, their min/max, the largest peak memory, and the ratio of the
        median latency to the first contender's.
    """
    for contender in contenders:
        config_file, _, way = contender.partition("@")
        if way not in ("", "original", "compile"):
            raise ValueError(f"--compare {contender!r}: the suffixes are '@original' and '@compile'")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--compare: config file {config_file!r} does not exist")
    runs = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for i, contender in enumerate(contenders):
                config_file, _, way = contender.partition("@")
                out = os.path.join(tmp, f"{rep}_{i}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--config-file", config_file, "--tasks", *tasks,
                       "--batch-size", str(batch_size), "--warmup", str(warmup), "--iters", str(iters), "--json", out]
                if input_size:
                    cmd += ["--input-size", *map(str, input_size)]
                if threads:
                    cmd += ["--threads", str(threads)]
                if way:
                    cmd.append("--original-execution" if way == "original" else "--compile")
                logger.info(f"repetition {rep + 1}/{repeats}: {contender}")
                done = subprocess.run(cmd + list(opts), capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"--compare: {contender} failed:\n{done.stderr[-3000:]}")
                with open(out) as f:
                    runs[contender].append(json.load(f))
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "threads": threads or torch.get_num_threads(), "torch": torch.__version__},
        "repeats": repeats, "batch_size": batch_size, "input_size": input_size, "contenders": {},
    }
    for contender, reps in runs.items():
        entry = {"device": reps[0]["device"]}
        for task in tasks:
            ips = [r[task]["images_per_s"] for r in reps]
            lat = [r[task]["latency_ms"]["p50"] for r in reps]
            entry[task] = {
                "images_per_s": float(np.median(ips)), "latency_ms": float(np.median(lat)),
                "latency_ms_min": float(min(lat)), "latency_ms_max": float(max(lat)),
                "peak_memory_mib": float(max(r[task]["peak_memory_mib"] for r in reps)),
                "warmup_s": float(np.median([r[task]["warmup_s"] for r in reps])),
            }
        result["contenders"][contender] = entry
    first = result["contenders"][contenders[0]]
    for entry in result["contenders"].values():
        for task in tasks:
            entry[task]["ratio"] = entry[task]["latency_ms"] / first[task]["latency_ms"]
    return result


def compare_table(result, tasks):
    rows = []
    for contender, entry in result["contenders"].items():
        for task in tasks:
            r = entry[task]
            rows.append([contender, task, f"{r['images_per_s']:.2f}", f"{r['latency_ms']:.1f}",
                         f"{r['latency_ms_min']:.1f}-{r['latency_ms_max']:.1f}", f"{r['ratio']:.2f}",
                         f"{r['peak_memory_mib']:.0f}", f"{r['warmup_s']:.1f}"])
    headers = ["contender", "task", "img/s", "median ms", "spread ms", "x first", "peak MiB", "warm-up s"]
    return tabulate(rows, headers=headers, tablefmt="pipe")


def get_parser():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--config-file", metavar="FILE")
    target.add_argument("--compare", nargs="+", metavar="FILE[@original|@compile]",
                        help="time these configs side by side (interleaved repetitions, one process each)")
    parser.add_argument("--repeats", type=int, default=3, help="with --compare: repetitions of every contender")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--tasks", nargs="+", choices=("inference", "train"), default=["inference", "train"]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--input-size", nargs=2, type=int, metavar=("H", "W"), help="default INPUT.CROP.SIZE"
    )
    size.add_argument(
        "--dataset-images", action="store_true", help="use the config's dataset images"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per iteration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this file")
    parser.add_argument(
        "--profile", action="store_true", help="also print the per-op time of one inference forward"
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="TEST.COMPILE: backbone and head compiled by torch.compile (inductor); the warm-up compiles",
    )
    parser.add_argument(
        "--original-execution",
        action="store_true",
        help="run the model the original's way: fp32, unfused attention, brute-force KNN",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


ORIGINAL_EXECUTION_OPTS = ["SOLVER.AMP.ENABLED", "False", "MODEL.AFF.FUSED_ATTENTION", "False"]


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="aff_seg")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = list(args.opts)
    if args.compare:
        if args.profile or args.original_execution or args.compile or args.dataset_images:
            raise ValueError("--compare takes neither --profile, --original-execution (use CFG@original), "
                             "--compile (use CFG@compile) "
                             "nor --dataset-images")
        result = compare(args.compare, args.tasks, opts, input_size=args.input_size, batch_size=args.batch_size,
                         warmup=args.warmup, iters=args.iters, repeats=args.repeats, threads=args.threads)
        print(compare_table(result, args.tasks))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result
    if args.compile:
        opts += ["TEST.COMPILE", "True"]
    if args.original_execution:
        opts += ORIGINAL_EXECUTION_OPTS
        clusten.set_knn_method("brute_force")
    cfg = setup_cfg(args.config_file, opts)
    result = run(
        cfg,
        args.tasks,
        input_size=args.input_size,
        dataset_images=args.dataset_images,
        batch_size=args.batch_size,
        warmup=args.warmup,
        iters=args.iters,
    )
    result["config"]["file"] = args.config_file
    result["config"]["original_execution"] = args.original_execution
    print(table(result, args.tasks))
    if args.profile:
        height, width = args.input_size or tuple(cfg.INPUT.CROP.SIZE)
        torch.manual_seed(0)
        model = build_loaded_model(cfg)
        batch = fixed_size_inputs(height, width, args.batch_size)
        result["op_breakdown"] = op_breakdown(model, cfg, batch)
        print(tabulate(result["op_breakdown"], headers="keys", floatfmt=".2f", tablefmt="pipe"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
