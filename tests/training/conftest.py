"""Synthetic datasets and tiny configs for the training-harness tests.

Every run uses a synthetic root (``aff_seg.data.synthetic``) under the standard dataset names,
the configs of ``configs/synthetic`` and overrides that shrink the model and schedule further,
so that a training iteration takes about a second on one CPU core.
"""
import os

import pytest

import aff_seg  # noqa: F401  (compat fixes before detectron2)
from aff_seg import add_maskformer2_config
from aff_seg.data.datasets import datasets_root, register_standard_datasets
from aff_seg.data.synthetic import make_synthetic_datasets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")

# a model of a few hundred thousand parameters, a few-iteration schedule, 64-px inputs
TINY_OPTS = [
    "MODEL.AFF.EMBED_DIM", "[16, 32, 32, 32]",
    "MODEL.AFF.DEPTHS", "[1, 1, 1, 1]",
    "MODEL.AFF.NUM_HEADS", "[1, 2, 2, 2]",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "2",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "TEST.EVAL_PERIOD", "0",
    "DATALOADER.NUM_WORKERS", "0",
]
# input sizes for the crop-based configs (the LSJ ones set INPUT.IMAGE_SIZE instead)
TINY_CROP_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "[64]",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.CROP.SIZE", "[64, 64]",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
]
TINY_LSJ_OPTS = ["INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]

# task -> synthetic config
TASKS = {
    "ade20k_semantic": "synthetic/ade20k_semantic.yaml",
    "cityscapes_instance": "synthetic/cityscapes_instance.yaml",
    "cityscapes_panoptic": "synthetic/cityscapes_panoptic.yaml",
    "coco_instance": "synthetic/coco_instance.yaml",
    "coco_panoptic": "synthetic/coco_panoptic.yaml",
}


def tiny_opts(task, output_dir, *extra):
    """Overrides (a flat KEY VALUE list) for a tiny run of ``task`` writing to ``output_dir``."""
    size_opts = TINY_LSJ_OPTS if task.startswith("coco") else TINY_CROP_OPTS
    return TINY_OPTS + size_opts + ["OUTPUT_DIR", str(output_dir)] + [str(x) for x in extra]


def tiny_cfg(task, output_dir, *extra):
    """The frozen config of a tiny run of ``task``."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, TASKS[task]))
    cfg.merge_from_list(tiny_opts(task, output_dir, *extra))
    cfg.freeze()
    return cfg


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny models run fastest on one thread (several threads thrash on a loaded machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("training_datasets"))
    make_synthetic_datasets(
        root, num_train=4, num_val=2, seed=5, min_side=64, max_side=96, cityscapes_size=(64, 128)
    )
    return root


@pytest.fixture
def registered_root(synthetic_root, monkeypatch):
    """The standard dataset names pointed at the synthetic root (and $DETECTRON2_DATASETS set
    for subprocesses) for one test."""
    default_root = datasets_root()
    monkeypatch.setenv("DETECTRON2_DATASETS", synthetic_root)
    register_standard_datasets(synthetic_root)
    yield synthetic_root
    register_standard_datasets(default_root)


def semantic_train_and_infer(model, height=64, width=96):
    """One training step (two masks, loss finite, backward run) and one inference at half size
    of a semantic MaskFormer; returns the inference result."""
    import torch
    from detectron2.structures import Instances

    instances = Instances((height, width))
    instances.gt_classes = torch.tensor([3, 7])
    instances.gt_masks = torch.zeros(2, height, width, dtype=torch.bool)
    instances.gt_masks[0, :, : width // 2] = True
    instances.gt_masks[1, :, width // 2:] = True
    image = torch.randint(0, 255, (3, height, width), dtype=torch.uint8)
    model.train()
    total = sum(model([{"image": image, "instances": instances}]).values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": image, "height": height // 2, "width": width // 2}])
    return result
