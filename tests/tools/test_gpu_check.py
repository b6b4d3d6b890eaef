"""tools/gpu_check.sh --dry-run: every step of the GPU check at toy sizes on the CPU."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, import_script


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--budget", "900"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [s["name"] for s in report["steps"]] == ["build", "cuda_tests", "op_benchmark", "knn_1m",
                                                     "model_benchmark_b1"]
    assert all(s["status"] == "ok" for s in report["steps"]), [(s["name"], s["status"]) for s in report["steps"]]
    assert report["steps"][2]["result"], "the op benchmark wrote no rows"
    knn = [r for r in report["steps"][3]["result"]["rows"] if r["shapes"] == "128x128 b1"]
    assert [r["op"] for r in knn] == ["knn (brute force)", "knn (grid)"] and all(r["identical"] for r in knn)
    compared = report["steps"][-1]["result"]["contenders"]
    assert len(compared) == 3 and all({"inference", "train"} <= set(entry) for entry in compared.values())
    table = (out / "gpu_check.md").read_text()
    assert "| model_benchmark_b1 | ok |" in table and "@original | train |" in table


def test_the_full_run_covers_every_measurement_of_the_check():
    """Without running it: the GPU plan builds the kernels, runs every cuda test, benchmarks the ops
    in bf16 and KNN at 1M queries, and AFF-Tiny our way / the original's way / grid Mask2Former
    Swin-T at 512x512, batch 1 and 8, inference and training, in bf16."""
    gpu_check = import_script("tools", "gpu_check")
    plan = {name: (command, limit, json_name) for name, command, limit, json_name in gpu_check.steps(False, "py")}
    assert list(plan) == ["build", "cuda_tests", "op_benchmark", "knn_1m", "model_benchmark_b1", "model_benchmark_b8"]
    assert "load_extension" in " ".join(plan["build"][0])
    assert plan["cuda_tests"][0][-3:] == ["-m", "cuda", "tests"]
    ops = " ".join(plan["op_benchmark"][0])
    assert "--device cuda --dtype bfloat16" in ops and "--ops" not in ops and "--small" not in ops
    assert "--knn-size 4096 4096" in " ".join(plan["knn_1m"][0])  # (4096 / 4)^2 = 1,048,576 queries
    for batch in (1, 8):
        command = plan[f"model_benchmark_b{batch}"][0]
        contenders = command[command.index("--compare") + 1:command.index("--tasks")]
        assert contenders == [gpu_check.ADE_TINY, gpu_check.ADE_TINY + "@original", gpu_check.M2F_SWIN_TINY]
        line = " ".join(command)
        assert f"--tasks inference train --batch-size {batch} --input-size 512 512" in line
        assert "SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bfloat16" in line
    assert all(os.path.isfile(os.path.join(ROOT, c)) for c in (gpu_check.ADE_TINY, gpu_check.M2F_SWIN_TINY))


def test_a_spent_budget_skips_the_remaining_steps_and_still_reports(tmp_path):
    """The check stops starting steps when its --budget (8 minutes by default) is spent."""
    gpu_check = import_script("tools", "gpu_check")
    assert gpu_check.BUDGET_S == 8 * 60
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run",
                           "--budget", "0", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["skipped: the budget is spent"] * 5
    assert "| build | skipped: the budget is spent |" in (tmp_path / "gpu_check.md").read_text()


def test_refuses_a_full_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--dry-run" in done.stderr
