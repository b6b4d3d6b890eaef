"""Label maps that do not fit their image, and class ids outside the model's classes, are named
by file: a wrong size or channel count in the mappers, an out-of-range id in the loss."""
import copy

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from PIL import Image

from aff_seg.data.dataset_mappers import build_train_mapper

from .conftest import tiny_cfg


def record_with_label(cfg, key, tmp_path, change):
    """The first training record of ``cfg`` with its ``key`` label file replaced by ``change(array)``."""
    record = copy.deepcopy(DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[0])
    label = np.asarray(Image.open(record[key]))
    path = tmp_path / "label.png"
    Image.fromarray(change(label)).save(path)
    record[key] = str(path)
    return record, str(path)


@pytest.mark.parametrize("task,key,change,message", [
    ("ade20k_semantic", "sem_seg_file_name", lambda a: np.stack([a] * 3, -1), "must have one channel"),
    ("ade20k_semantic", "sem_seg_file_name", lambda a: a[:-5], "label map of"),
    ("cityscapes_panoptic", "pan_seg_file_name", lambda a: a[:, :-3], "label map of"),
])
def test_label_map_that_does_not_fit_its_image_names_the_file(registered_root, tmp_path, task, key, change, message):
    cfg = tiny_cfg(task, tmp_path)
    record, path = record_with_label(cfg, key, tmp_path, change)
    with pytest.raises(ValueError, match=message) as e:
        build_train_mapper(cfg)(record)
    assert path in str(e.value)


def test_out_of_range_class_id_names_the_image(registered_root, tmp_path):
    cfg = tiny_cfg("ade20k_semantic", tmp_path)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    record, _ = record_with_label(cfg, "sem_seg_file_name", tmp_path,
                                  lambda a: np.full_like(a, num_classes + 3))
    np.random.seed(0)
    inputs = [build_train_mapper(cfg)(record)]
    model = build_model(cfg).train()
    with pytest.raises(ValueError, match=rf"\({record['file_name']}\) has class ids \[{num_classes + 3}\]"):
        model(inputs)
