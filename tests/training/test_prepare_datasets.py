"""The dataset preparation scripts on tiny fakes (the real datasets are not available here)."""
import glob
import os
import runpy
import shutil

import numpy as np
from PIL import Image

from .conftest import REPO

SCRIPTS = os.path.join(REPO, "tools", "datasets")


def script(name):
    return runpy.run_path(os.path.join(SCRIPTS, name))


def test_ade20k_labels_shift_down_with_other_ignored(tmp_path):
    source = tmp_path / "ADEChallengeData2016" / "annotations"
    for split in ("training", "validation"):
        (source / split).mkdir(parents=True)
        Image.fromarray(np.array([[0, 1, 150]], dtype=np.uint8)).save(source / split / "ADE_x.png")
    script("prepare_ade20k_sem_seg.py")["main"](["--root", str(tmp_path)])
    out = np.asarray(Image.open(tmp_path / "ADEChallengeData2016" / "annotations_detectron2" / "validation" / "ADE_x.png"))
    assert out.tolist() == [[255, 0, 149]]


def test_coco_semantic_maps_match_the_panoptic_segments(synthetic_root, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(os.path.join(synthetic_root, "coco"), coco)
    expected = {p: np.asarray(Image.open(p)) for p in glob.glob(str(coco / "panoptic_semseg_val2017" / "*.png"))}
    shutil.rmtree(coco / "panoptic_semseg_val2017")
    count = script("prepare_coco_semantic_annos_from_panoptic_annos.py")["convert_split"](str(coco), "val2017", workers=1)
    assert count == len(expected) > 0
    for path, labels in expected.items():  # the synthetic generator writes the same convention
        assert np.array_equal(np.asarray(Image.open(path)), labels)


def test_cityscapes_labels_come_from_cityscapesscripts(synthetic_root, tmp_path):
    city = tmp_path / "cityscapes"
    shutil.copytree(os.path.join(synthetic_root, "cityscapes"), city)
    train_ids = sorted(glob.glob(str(city / "gtFine" / "*" / "*" / "*_labelTrainIds.png")))
    expected = {p: np.asarray(Image.open(p)) for p in train_ids}
    for p in train_ids:
        os.remove(p)
    shutil.rmtree(city / "gtFine" / "cityscapes_panoptic_val")
    os.remove(city / "gtFine" / "cityscapes_panoptic_val.json")
    script("prepare_cityscapes.py")["prepare"](str(city))
    for path, labels in expected.items():
        assert np.array_equal(np.asarray(Image.open(path)), labels)
    assert (city / "gtFine" / "cityscapes_panoptic_val.json").is_file()
    assert glob.glob(str(city / "gtFine" / "cityscapes_panoptic_val" / "*.png"))


def test_cocofied_lvis_v1():
    cocofy = script("prepare_cocofied_lvisv1.py")["cocofy_lvis"]
    lvis = {
        "info": {"v": 1},
        "categories": [
            {"id": 10, "synset": "person.n.01", "name": "person"},
            {"id": 20, "synset": "dog.n.01", "name": "dog"},
            {"id": 30, "synset": "aardvark.n.01", "name": "aardvark"},
            {"id": 40, "synset": "car.n.01", "name": "car"},
        ],
        "images": [
            {"id": 7, "coco_url": "http://images.cocodataset.org/train2017/a.jpg",
             "not_exhaustive_category_ids": [], "neg_category_ids": []},
            {"id": 8, "coco_url": "http://images.cocodataset.org/val2017/b.jpg",
             "not_exhaustive_category_ids": [30, 20], "neg_category_ids": [10]},
            {"id": 9, "coco_url": "http://images.cocodataset.org/val2017/c.jpg",
             "not_exhaustive_category_ids": [], "neg_category_ids": []},
        ],
        "annotations": [
            {"id": 100, "image_id": 7, "category_id": 10},  # train2017 image: dropped
            {"id": 101, "image_id": 8, "category_id": 30},  # not a COCO class: dropped
            {"id": 102, "image_id": 9, "category_id": 10},
            {"id": 103, "image_id": 8, "category_id": 20},
        ],
    }
    out = cocofy(lvis)
    assert [(i["id"], i["file_name"]) for i in out["images"]] == [(1, "b.jpg"), (2, "c.jpg")]
    assert out["images"][0]["not_exhaustive_category_ids"] == [18] and out["images"][0]["neg_category_ids"] == [1]
    assert [(a["id"], a["image_id"], a["category_id"]) for a in out["annotations"]] == [(1, 2, 1), (2, 1, 18)]
    assert sorted(c["id"] for c in out["categories"]) == [1, 18]  # car has no instance
    assert out["info"] == {"v": 1} and len(lvis["images"]) == 3  # the input is untouched
