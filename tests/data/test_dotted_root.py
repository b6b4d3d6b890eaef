"""Every registered dataset that the synthetic data covers loads and evaluates from a root whose
path has dots in it (``/home/j.doe/datasets``, ``mktemp -d`` folders)."""
import os

import pytest
from detectron2.data import DatasetCatalog

from aff_seg.data.datasets import datasets_root, register_standard_datasets
from aff_seg.data.synthetic import evaluate_ground_truth, make_synthetic_datasets

# ADE20K; COCO instance, panoptic and semantic (panoptic_with_sem_seg); Cityscapes semantic,
# instance and panoptic; LVIS v1
NAMES = [
    f"{name}_{split}" if not name.startswith("coco") else name.format(split)
    for split in ("train", "val")
    for name in ("ade20k_sem_seg", "coco_2017_{}", "coco_2017_{}_panoptic",
                 "coco_2017_{}_panoptic_with_sem_seg", "cityscapes_fine_sem_seg",
                 "cityscapes_fine_instance_seg", "cityscapes_fine_panoptic", "lvis_v1")
]
FILE_KEYS = ("file_name", "sem_seg_file_name", "pan_seg_file_name")


@pytest.fixture(scope="module")
def dotted_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("home") / "j.doe" / "datasets.v2")
    make_synthetic_datasets(root, num_train=2, num_val=1, seed=5)
    register_standard_datasets(root)
    yield root
    register_standard_datasets(datasets_root())


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_existing_files(dotted_root, name):
    records = DatasetCatalog.get(name)
    assert records, name
    for record in records:
        for key in FILE_KEYS:
            if key in record:
                assert record[key].startswith(dotted_root) and os.path.isfile(record[key]), record[key]


def test_ground_truth_evaluates_to_100(dotted_root):
    results = evaluate_ground_truth(dotted_root, verbose=False)
    assert "cityscapes_fine_panoptic_val PQ" in results and "lvis_v1_val segm AP" in results
    assert all(value == pytest.approx(100.0) for value in results.values()), results
