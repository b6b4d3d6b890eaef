"""tools/gpu_check.sh --dry-run: every step of the GPU check at toy sizes on the CPU."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [s["name"] for s in report["steps"]] == ["build", "cuda_tests", "op_benchmark", "model_benchmark_b1"]
    assert all(s["status"] == "ok" for s in report["steps"]), [(s["name"], s["status"]) for s in report["steps"]]
    assert report["steps"][2]["result"], "the op benchmark wrote no rows"
    compared = report["steps"][-1]["result"]["contenders"]
    assert len(compared) == 2 and all({"inference", "train"} <= set(entry) for entry in compared.values())
    table = (out / "gpu_check.md").read_text()
    assert "| model_benchmark_b1 | ok |" in table and "@original | train |" in table


def test_refuses_a_full_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--dry-run" in done.stderr
