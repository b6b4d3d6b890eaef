"""Bad run inputs stop train_net.py and analyze_model.py with one line naming the file or key,
before any model is built."""
import glob
import importlib
import os
import sys

import pytest

from aff_seg import load_config
from aff_seg.data.datasets import datasets_root, register_standard_datasets
from aff_seg.data.synthetic import make_synthetic_datasets
from aff_seg.engine import check_run_inputs
from aff_seg.engine.launch import check_num_classes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADE_MINI = os.path.join(ROOT, "configs/ade20k/semantic-segmentation/aff/maskformer2_aff_mini_bs32_80k.yaml")


@pytest.fixture(scope="module")
def train_net():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module("train_net")


@pytest.fixture
def ade_root(tmp_path):
    make_synthetic_datasets(str(tmp_path), datasets=("ade20k",), num_train=1, num_val=1)
    register_standard_datasets(str(tmp_path))
    yield tmp_path
    register_standard_datasets(datasets_root())


def _error(main, argv, monkeypatch):
    """The message ``main(argv)`` exits with; building a model would fail the test."""
    import detectron2.modeling

    monkeypatch.setattr(detectron2.modeling, "build_model", lambda cfg: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert "\n" not in message, message
    return message


def test_missing_weights_file(train_net, analyze_model, monkeypatch):
    # the published config names the converted ImageNet checkpoint, which is not here
    for main, argv in ((train_net.cli, ["--config-file", ADE_MINI]),
                       (analyze_model.main, ["--config-file", ADE_MINI, "--tasks", "parameter"])):
        message = _error(main, argv, monkeypatch)
        assert "MODEL.WEIGHTS: weights file not found: aff_mini.pkl" in message and "MODEL_ZOO.md" in message


def test_missing_dataset_folder(train_net, tmp_path, monkeypatch):
    register_standard_datasets(str(tmp_path / "nothing"))
    try:
        message = _error(train_net.cli, ["--config-file", ADE_MINI, "MODEL.WEIGHTS", ""], monkeypatch)
    finally:
        register_standard_datasets(datasets_root())
    assert "dataset 'ade20k_sem_seg_train'" in message and str(tmp_path / "nothing") in message
    assert "make_synthetic_datasets.py" in message


def test_config_key_typo(train_net, monkeypatch):
    message = _error(train_net.cli, ["--config-file", ADE_MINI, "SOLVER.MAX_ITERS", "3"], monkeypatch)
    assert message.endswith("config key SOLVER.MAX_ITERS (from the command-line overrides) does not exist: "
                            "did you mean SOLVER.MAX_ITER or SOLVER.WARMUP_ITERS or SOLVER.STEPS?")


def test_class_count_mismatch(train_net, ade_root, monkeypatch):
    message = _error(train_net.cli, ["--config-file", ADE_MINI, "MODEL.WEIGHTS", "",
                                     "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "20"], monkeypatch)
    assert message.endswith("MODEL.SEM_SEG_HEAD.NUM_CLASSES is 20, but dataset 'ade20k_sem_seg_train' has 150 "
                            "classes (stuff_classes): set MODEL.SEM_SEG_HEAD.NUM_CLASSES 150")


def test_good_inputs_pass(ade_root):
    check_run_inputs(load_config(ADE_MINI, ["MODEL.WEIGHTS", ""]))


def test_shipped_configs_have_their_datasets_class_count():
    configs = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    for config in sorted(c for c in configs if not os.path.basename(c).startswith("Base-")):  # Bases set none
        cfg = load_config(config)
        for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
            check_num_classes(cfg, name)
