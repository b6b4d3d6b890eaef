"""The registrations aff_seg adds (aff_seg/data/datasets.py) and the clear errors for missing
dataset roots and splits."""
import os

import pytest

import aff_seg  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog

from aff_seg.data.datasets import (
    ADE20K_SEM_SEG_COLORS,
    check_dataset_exists,
    datasets_root,
    register_standard_datasets,
)
from aff_seg.data.synthetic import make_synthetic_datasets


@pytest.fixture
def restore_registrations():
    yield
    register_standard_datasets(datasets_root())


def test_ade20k_has_the_standard_palette():
    for name in ("ade20k_sem_seg_train", "ade20k_sem_seg_val"):
        metadata = MetadataCatalog.get(name)
        assert len(metadata.stuff_colors) == len(metadata.stuff_classes) == 150
        assert metadata.stuff_colors[:3] == [[120, 120, 120], [180, 120, 120], [6, 230, 230]]
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_SEM_SEG_COLORS)


def test_lvis_v1_val_cocofied_is_registered():
    metadata = MetadataCatalog.get("lvis_v1_val_cocofied")
    assert metadata.json_file == os.path.join(datasets_root(), "lvis/lvis_v1_val_cocofied.json")
    assert metadata.evaluator_type == "lvis"
    assert len(metadata.thing_classes) == 80


def test_coco_panoptic_with_sem_seg_has_mask2formers_metadata():
    metadata = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert metadata.evaluator_type == "coco_panoptic_seg"
    assert metadata.sem_seg_root == os.path.join(datasets_root(), "coco/panoptic_semseg_val2017")
    assert len(metadata.stuff_classes) == 133 and len(metadata.thing_classes) == 80
    assert len(metadata.stuff_dataset_id_to_contiguous_id) == 133  # things too, for sem seg
    assert len(MetadataCatalog.get("coco_2017_train_panoptic").thing_classes) == 80


def test_register_standard_datasets_moves_every_name(tmp_path, restore_registrations):
    before = set(DatasetCatalog.list())
    register_standard_datasets(str(tmp_path))
    assert set(DatasetCatalog.list()) == before
    for name, key in [("coco_2017_train", "image_root"), ("ade20k_sem_seg_val", "image_root"),
                      ("cityscapes_fine_panoptic_val", "panoptic_json"),
                      ("coco_2017_val_panoptic_with_sem_seg", "sem_seg_root"),
                      ("lvis_v1_val_cocofied", "json_file")]:
        assert getattr(MetadataCatalog.get(name), key).startswith(str(tmp_path)), name


@pytest.mark.parametrize("name, expected", [
    ("ade20k_sem_seg_val", "ADEChallengeData2016/images/validation"),
    ("coco_2017_train", "coco/train2017"),
    ("coco_2017_val_panoptic_with_sem_seg", "coco/val2017"),
    ("cityscapes_fine_panoptic_train", "cityscapes/leftImg8bit/train"),
    ("cityscapes_fine_sem_seg_val", "cityscapes/leftImg8bit/val"),
])
def test_missing_root_names_the_path_and_the_fix(tmp_path, restore_registrations, name,
                                                 expected):
    root = str(tmp_path / "absent")
    register_standard_datasets(root)
    with pytest.raises(FileNotFoundError) as error:
        DatasetCatalog.get(name)
    message = str(error.value)
    assert os.path.join(root, expected) in message
    assert f"make_synthetic_datasets.py --root {root}" in message


def test_missing_split_names_the_split(tmp_path, restore_registrations):
    make_synthetic_datasets(str(tmp_path), datasets=("ade20k", "coco"), num_train=2, num_val=0)
    register_standard_datasets(str(tmp_path))
    assert len(DatasetCatalog.get("ade20k_sem_seg_train")) == 2
    with pytest.raises(FileNotFoundError, match="images/validation does not exist"):
        DatasetCatalog.get("ade20k_sem_seg_val")
    with pytest.raises(FileNotFoundError, match="instances_val2017.json|val2017 does not exist"):
        DatasetCatalog.get("coco_2017_val")


def test_empty_folder_is_reported(tmp_path, restore_registrations):
    (tmp_path / "ADEChallengeData2016" / "images" / "validation").mkdir(parents=True)
    register_standard_datasets(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="validation is empty"):
        check_dataset_exists("ade20k_sem_seg_val")


def test_unknown_name():
    with pytest.raises(KeyError, match="not registered"):
        check_dataset_exists("no_such_dataset_train")
