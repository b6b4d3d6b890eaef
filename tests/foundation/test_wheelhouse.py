"""The offline wheelhouse: builds, fits the budget, installs with --no-index, imports."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheelhouse_builds_and_installs_offline(tmp_path):
    wh = tmp_path / "wh"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_wheelhouse.py"), "--preset", "gpu-node",
         "--out", str(wh), "--max-mib", "64"],
        check=True, capture_output=True, text=True,
    )
    wheels = sorted(p.name for p in wh.glob("*.whl"))
    assert any(n.startswith("pb1_detectron2-0.6") for n in wheels), wheels
    assert any(n.startswith("aff_seg-") for n in wheels), wheels
    assert any(n.startswith("fvcore-") for n in wheels), wheels
    assert not any(n.startswith(("torch-", "torchvision-", "triton-", "nvidia")) for n in wheels)
    assert sum(p.stat().st_size for p in wh.glob("*.whl")) <= 64 * 2**20

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
         *map(str, wh.glob("*.whl"))],
        check=True, capture_output=True, text=True,
    )
    code = "import aff_seg, detectron2, fvcore; print(detectron2.__file__); print(aff_seg.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    d2_file, aff_file = out.stdout.split()
    assert d2_file.startswith(str(target)) and aff_file.startswith(str(target))


def test_wheelhouse_over_budget_fails_clearly(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_wheelhouse.py"), "--out", str(tmp_path / "wh"),
         "--exclude", "scipy,opencv-python-headless", "--max-mib", "1"],
        capture_output=True, text=True,
    )
    assert out.returncode != 0
    assert "exceeds --max-mib 1" in out.stderr
