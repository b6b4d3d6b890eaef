"""The five training mappers on the synthetic datasets: shapes, padding, one target per segment."""
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from aff_seg.data.dataset_mappers import (
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    TRAIN_MAPPERS,
    build_train_mapper,
)
from aff_seg.data.dataset_mappers.utils import pad_to_multiple

from .conftest import tiny_cfg


def map_first(cfg, mapper):
    record = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[0]
    np.random.seed(0)
    return record, mapper(record)


def check_targets(out):
    image, instances = out["image"], out["instances"]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert instances.image_size == tuple(image.shape[-2:])
    assert instances.gt_masks.shape == (len(instances.gt_classes), *image.shape[-2:])
    assert len(instances.gt_classes) > 0
    return image, instances


def test_pad_to_multiple():
    x = torch.zeros(2, 5, 7)
    padded = pad_to_multiple(x, 4, 9)
    assert padded.shape == (2, 8, 8)
    assert padded[:, 5:].eq(9).all() and padded[:, :, 7:].eq(9).all() and padded[:, :5, :7].eq(0).all()
    assert pad_to_multiple(x, -1, 9) is x


def test_semantic_mapper_pads_and_makes_one_mask_per_class(registered_root, tmp_path):
    cfg = tiny_cfg("ade20k_semantic", tmp_path, "INPUT.SIZE_DIVISIBILITY", "96")
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, MaskFormerSemanticDatasetMapper)
    _, out = map_first(cfg, mapper)
    image, instances = check_targets(out)
    sem_seg = out["sem_seg"]
    assert image.shape[-2:] == (96, 96) and sem_seg.shape == (96, 96)
    assert sem_seg[64:].eq(255).all() and image[:, 64:].eq(128).all()  # 64-px crop padded to 96
    classes = sorted(set(sem_seg.unique().tolist()) - {255})
    assert instances.gt_classes.tolist() == classes
    for c, mask in zip(instances.gt_classes, instances.gt_masks):
        assert torch.equal(mask.bool(), sem_seg == c)


def test_instance_mapper(registered_root, tmp_path):
    cfg = tiny_cfg("cityscapes_instance", tmp_path, "INPUT.SIZE_DIVISIBILITY", "32")
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, MaskFormerInstanceDatasetMapper)
    _, out = map_first(cfg, mapper)
    image, instances = check_targets(out)
    assert image.shape[-2] % 32 == 0 and image.shape[-1] % 32 == 0
    assert instances.gt_classes.max() < 8  # Cityscapes' 8 thing classes


def test_panoptic_mapper_targets_are_the_segments(registered_root, tmp_path):
    cfg = tiny_cfg("cityscapes_panoptic", tmp_path)
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, MaskFormerPanopticDatasetMapper)
    record, out = map_first(cfg, mapper)
    _, instances = check_targets(out)
    masks = instances.gt_masks.bool()
    assert not (masks.sum(0) > 1).any()  # panoptic segments do not overlap
    assert set(instances.gt_classes.tolist()) <= {s["category_id"] for s in record["segments_info"]}


@pytest.mark.parametrize("task, mapper_type", [
    ("coco_instance", COCOInstanceNewBaselineDatasetMapper),
    ("coco_panoptic", COCOPanopticNewBaselineDatasetMapper),
])
def test_lsj_mappers_give_a_fixed_square(registered_root, tmp_path, task, mapper_type):
    cfg = tiny_cfg(task, tmp_path)
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, mapper_type)
    _, out = map_first(cfg, mapper)
    _, instances = check_targets(out)
    assert tuple(out["image"].shape[-2:]) == (64, 64)
    assert instances.gt_masks.flatten(1).any(1).all()  # no empty target
    assert len(instances.gt_boxes) == len(instances.gt_classes)


def test_unknown_mapper_name_is_named(registered_root, tmp_path):
    cfg = tiny_cfg("ade20k_semantic", tmp_path).clone()
    cfg.defrost()
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    with pytest.raises(ValueError, match="INPUT.DATASET_MAPPER_NAME"):
        build_train_mapper(cfg)


@pytest.mark.parametrize("name", sorted(TRAIN_MAPPERS))
def test_every_mapper_is_a_training_mapper(name, tmp_path):
    """Every mapper refuses is_train=False the same way, naming itself."""
    cfg = tiny_cfg("ade20k_semantic", tmp_path)
    with pytest.raises(ValueError, match=f"{TRAIN_MAPPERS[name].__name__} is a training mapper"):
        TRAIN_MAPPERS[name](cfg, False)
