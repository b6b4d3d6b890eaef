"""A small synthetic datasets root shared by the tests of this folder.

detectron2 registers its standard dataset names once, from $DETECTRON2_DATASETS at import;
``register_standard_datasets`` points them at the synthetic root for these tests and back at
the default root afterwards, so other test folders see the usual registrations.
"""
import pytest

import aff_seg  # noqa: F401  (compat fixes before detectron2)
from aff_seg.data.datasets import datasets_root, register_standard_datasets
from aff_seg.data.synthetic import make_synthetic_datasets


@pytest.fixture(scope="session")
def synthetic_args():
    """Small, but several images per split and more than one Cityscapes city."""
    return dict(num_train=4, num_val=2, seed=3)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory, synthetic_args):
    root = str(tmp_path_factory.mktemp("synthetic_datasets"))
    make_synthetic_datasets(root, **synthetic_args)
    return root


@pytest.fixture
def registered_root(synthetic_root):
    """The standard dataset names, pointed at the synthetic root for one test."""
    register_standard_datasets(synthetic_root)
    yield synthetic_root
    register_standard_datasets(datasets_root())
