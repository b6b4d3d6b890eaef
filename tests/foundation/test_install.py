"""Install guards: the pinned torch build, one torch, pins honoured, idempotent install."""
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _constraints():
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.split(r"===?", line, maxsplit=1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_torch_is_the_pinned_standard_cuda_build():
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == "2.13.0"
    assert torch.version.cuda is not None, "the CPU-only torch wheel was installed (torchvision needs the CUDA build)"
    assert torchvision.__version__.split("+")[0] == "0.28.0"
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


def test_exactly_one_torch_distribution():
    names = [d.metadata["Name"].lower() for d in md.distributions()]
    assert names.count("torch") == 1
    assert names.count("torchvision") == 1


def test_installed_versions_match_constraints():
    pins = _constraints()
    # the environment's own site-packages only: once pkg_resources is imported, setuptools'
    # vendored copies (e.g. packaging) are on sys.path too, with their own versions
    site = sysconfig.get_paths()["purelib"]
    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in md.distributions(path=[site])
    }
    wrong = {
        name: (want, installed.get(name))
        for name, want in pins.items()
        if installed.get(name, "").split("+")[0] != want.split("+")[0]
    }
    assert not wrong, f"installed versions differ from requirements/constraints.txt: {wrong}"


def test_every_requirement_is_pinned():
    pins = _constraints()
    for line in (ROOT / "requirements" / "base.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.sub(r"[-_.]+", "-", re.split(r"[=<>!~ ]", line, maxsplit=1)[0]).lower()
            assert name in pins, f"{name} is not pinned in requirements/constraints.txt"


def test_pip_check_clean_apart_from_the_no_deps_packages():
    """Only the two packages install.sh installs with --no-deps may report requirements: panopticapi-lite
    (numpy<2 and unused extras) and lvis (its opencv-python pin and unused build requirements; what it
    imports is installed, see test_imports)."""
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [
        l for l in out.stdout.splitlines()
        if l.strip() and not l.startswith("panopticapi-lite ")
        and not (l.startswith("lvis ") and l.endswith("which is not installed."))
    ]
    assert not problems, out.stdout


def test_imports():
    code = "import aff_seg, clusten, detectron2, torchvision, panopticapi, cityscapesscripts, pycocotools, lvis"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_clusten_needs_torch_alone():
    code = (
        "import sys\n"
        "for name in ('detectron2', 'aff_seg', 'fvcore', 'cv2', 'scipy', 'triton'):\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "import clusten, torch\n"
        "q = torch.randn(1, 2, 10, 4); idx = torch.randint(0, 10, (1, 10, 3))\n"
        "clusten.cluster_attention(q, q, q, idx, torch.zeros(1, 2, 10, 3), None, torch.zeros(2, 4), torch.zeros(2, 4))\n"
        "clusten.knn(q[0, :1, :, :2], q[0, :1, :, :2], 3)\n"
        "print('OK')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_second_install_is_quick_and_changes_nothing():
    start = time.perf_counter()
    out = subprocess.run(["bash", str(ROOT / "tools" / "install.sh")], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert "up to date" in out.stdout
    assert elapsed < 60, f"a second install took {elapsed:.0f}s"
