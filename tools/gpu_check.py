#!/usr/bin/env python
"""One-shot check of a machine with a CUDA GPU: build, correctness, speed, one report.

Steps (each with its own time limit, all of them within ``--budget`` seconds, 8 minutes by default;
a failing step is recorded and the next one runs; a step the budget leaves no time for is recorded
as skipped):

1. ``build``: compile and load the clusten CUDA extension;
2. ``cuda_tests``: every test marked ``cuda`` (kernels against their PyTorch references in
   float32/float16/bfloat16, forward and backward, deterministic repeats, no host sync);
3. ``op_benchmark``: ``python -m clusten.benchmark`` (every op, the fused attention against the
   original's unfused chain, at AFF-Tiny shapes: forward, forward + backward, peak memory;
   brute-force against grid KNN), bf16;
4. ``knn_1m``: brute-force against grid KNN at 1,048,576 queries (the stride-4 pixels of a
   4096 x 4096 image);
5. ``model_benchmark``: ``tools/benchmark.py --compare`` of AFF-Tiny (ADE20K, 512x512) our way
   and the original's way (and grid Mask2Former Swin-T where its config exists), inference and
   training, batch 1 and 8, bf16 autocast.

Writes ``gpu_check.json`` (every step: command, status, seconds, output tail, parsed results)
and ``gpu_check.md`` (the tables) into ``--out`` (default ``$OUT``).

``--dry-run`` runs every step at toy sizes on the CPU (the build step only resolves the build
configuration: CI compiles the kernels in its own test), so the script itself is tested
without a GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADE_TINY = "configs/ade20k/semantic-segmentation/aff/maskformer2_aff_tiny_bs32_80k.yaml"
M2F_SWIN_TINY = "configs/ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml"
SYNTHETIC = "configs/synthetic/ade20k_semantic.yaml"
SYNTHETIC_GRID = "configs/synthetic/ade20k_semantic_grid.yaml"  # stands in for the grid Mask2Former
OUTPUT_TAIL = 4000  # characters of each step's output kept in the json
BUDGET_S = 480  # the whole check, so that it fits one short call on a lent GPU machine


def steps(dry_run, python):
    """(name, command, time limit in s, json file the command writes or None) of every step."""
    if dry_run:
        build = [python, "-c", "import clusten.build as b; print('CUDA_HOME', b.cuda_home())"]
        tests = [python, "-m", "pytest", "-q", "-m", "cuda", "tests/clusten", "tests/modeling/backbone"]
        ops = [python, "-m", "clusten.benchmark", "--device", "cpu", "--small", "--min-run-time", "0.01"]
        knn = ops + ["--knn-size", "128", "128"]
        contenders = [SYNTHETIC, SYNTHETIC + "@original", SYNTHETIC_GRID]
        model_args = ["--input-size", "64", "64", "--warmup", "0", "--iters", "1", "--repeats", "1",
                      "--threads", "1"]
        batch_sizes = (1,)
    else:
        build = [python, "-c", "import clusten.build as b; b.load_extension(verbose=True); print('built')"]
        tests = [python, "-m", "pytest", "-q", "-m", "cuda", "tests"]
        ops = [python, "-m", "clusten.benchmark", "--device", "cuda", "--dtype", "bfloat16"]
        knn = [python, "-m", "clusten.benchmark", "--device", "cuda", "--min-run-time", "0.06",
               "--knn-size", "4096", "4096"]
        contenders = [ADE_TINY, ADE_TINY + "@original"]
        if os.path.isfile(os.path.join(ROOT, M2F_SWIN_TINY)):
            contenders.append(M2F_SWIN_TINY)
        model_args = ["--input-size", "512", "512", "--warmup", "3", "--iters", "10", "--repeats", "2"]
        batch_sizes = (1, 8)
    plan = [("build", build, 240, None), ("cuda_tests", tests, 150, None),
            ("op_benchmark", ops + ["--json", "op_benchmark.json"], 90, "op_benchmark.json"),
            ("knn_1m", knn + ["--ops", "knn", "--json", "knn_1m.json"], 45, "knn_1m.json")]
    for batch in batch_sizes:
        json_name = f"model_benchmark_b{batch}.json"
        command = [python, "tools/benchmark.py", "--compare", *contenders, "--tasks", "inference", "train",
                   "--batch-size", str(batch), *model_args, "--json", json_name, "MODEL.WEIGHTS", ""]
        if not dry_run:
            command += ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]
        plan.append((f"model_benchmark_b{batch}", command, 120, json_name))
    return plan


def run_step(name, command, limit, json_name, out_dir):
    """Run one step from the repository root; returns its record. ``limit`` <= 0: skipped."""
    start = time.perf_counter()
    if limit <= 0:
        print(f"[gpu_check] {name}: skipped (the budget is spent)", flush=True)
        return {"name": name, "command": " ".join(command), "status": "skipped: the budget is spent",
                "seconds": 0.0, "output_tail": ""}
    if json_name:
        command = [os.path.join(out_dir, json_name) if c == json_name else c for c in command]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit} s"
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    record = {"name": name, "command": " ".join(command), "status": status,
              "seconds": round(time.perf_counter() - start, 1), "output_tail": output[-OUTPUT_TAIL:]}
    if json_name and os.path.isfile(os.path.join(out_dir, json_name)):
        with open(os.path.join(out_dir, json_name)) as f:
            record["result"] = json.load(f)
    print(f"[gpu_check] {name}: {status} ({record['seconds']} s)", flush=True)
    return record


def markdown(report):
    lines = [f"# GPU check ({'dry run' if report['dry_run'] else 'full'})", "",
             f"device: {report['device']}; torch {report['torch']}", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in report["steps"]]
    for r in report["steps"]:
        if r["name"] in ("op_benchmark", "knn_1m"):
            lines += ["", f"## {r['name']}", "", "```", r["output_tail"].strip(), "```"]
        if "result" in r and "contenders" in r["result"]:
            lines += ["", f"## {r['name']}", "", "| contender | task | img/s | median ms | x first | peak MiB |",
                      "|---|---|---|---|---|---|"]
            for contender, entry in r["result"]["contenders"].items():
                for task in ("inference", "train"):
                    if task in entry:
                        t = entry[task]
                        lines.append(f"| {contender} | {task} | {t['images_per_s']:.2f} | {t['latency_ms']:.1f} | "
                                     f"{t['ratio']:.2f} | {t['peak_memory_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="One-shot build, correctness and speed check on a CUDA GPU.")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy sizes on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="report folder (default $OUT)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for all steps together (default {BUDGET_S})")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device visible: run with --dry-run to check the script on a CPU")
    os.makedirs(args.out, exist_ok=True)
    report = {"dry_run": args.dry_run, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "steps": []}
    deadline = time.perf_counter() + args.budget
    for name, command, limit, json_name in steps(args.dry_run, sys.executable):
        limit = int(min(limit, deadline - time.perf_counter()))
        report["steps"].append(run_step(name, command, limit, json_name, os.path.abspath(args.out)))
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:  # kept current if the run is cut off
            json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(f"[gpu_check] report: {os.path.join(args.out, 'gpu_check.md')}")
    return 0 if all(r["status"] == "ok" for r in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
