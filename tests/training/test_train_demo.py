"""The main job's script (tools/train_demo.py), on a short schedule."""
import json
import os
import runpy

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_trains_evaluates_and_visualises(tmp_path, monkeypatch):
    from aff_seg.data.datasets import datasets_root, register_standard_datasets

    demo = runpy.run_path(os.path.join(REPO, "tools", "train_demo.py"))
    default_root = datasets_root()
    try:
        summary = demo["main"](["--output-dir", str(tmp_path), "--iters", "4", "--num-train", "4",
                                "--num-val", "2", "--num-vis", "2", "TEST.EVAL_PERIOD", "0"])
    finally:
        register_standard_datasets(default_root)
    assert 0.0 <= summary["mIoU"] <= 100.0
    assert 0.0 < summary["mIoU_most_frequent_class"] <= 100.0
    assert len(summary["visualizations"]) == 2 and all(os.path.isfile(p) for p in summary["visualizations"])
    assert json.loads((tmp_path / "demo_summary.json").read_text())["iterations"] == 4
    assert (tmp_path / "model_final.pth").is_file()
