"""Shared helpers of the demo and tools tests: the tools' modules and a tiny AFF model."""
import importlib
import os
import sys

import pytest

import aff_seg  # noqa: F401  (compat fixes before detectron2)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADE_MINI = os.path.join(ROOT, "configs/ade20k/semantic-segmentation/aff/maskformer2_aff_mini_bs32_80k.yaml")

# a few-thousand-parameter AFF + Mask2Former, randomly initialised, testing at 64 px
TINY_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.AFF.EMBED_DIM", "[16, 16, 32, 32]",
    "MODEL.AFF.DEPTHS", "[1, 1, 1, 1]",
    "MODEL.AFF.NUM_HEADS", "[1, 1, 2, 2]",
    "MODEL.AFF.CLUSTER_SIZE", "4",
    "MODEL.AFF.NBHD_SIZE", "[16, 16, 16, 16]",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5",
    "MODEL.MASK_FORMER.NHEADS", "2",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "INPUT.CROP.SIZE", "(64, 64)",
]


def import_script(folder, name):
    """Import ``<ROOT>/<folder>/<name>.py`` as the top-level module ``name`` (as the scripts
    import each other)."""
    path = os.path.join(ROOT, folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def tiny_config():
    """(config file, overrides) of the tiny model."""
    return ADE_MINI, list(TINY_OPTS)


@pytest.fixture(scope="session")
def analyze_model():
    return import_script("tools", "analyze_model")


@pytest.fixture(scope="session")
def benchmark():
    return import_script("tools", "benchmark")


@pytest.fixture(scope="session")
def demo():
    return import_script("demo", "demo")


@pytest.fixture(scope="session")
def train_net():
    return import_script("", "train_net")
