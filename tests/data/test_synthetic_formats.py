"""Every synthetic format, read back through detectron2's own loaders (DatasetCatalog) and
through cityscapesscripts."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES, COCO_CATEGORIES
from detectron2.structures import BoxMode

from aff_seg.data.synthetic import CATEGORIES, KINDS, synthetic_sample

COCO_INDEX = {c["name"]: i for i, c in enumerate(COCO_CATEGORIES)}


def _read(path, dtype=None):
    return np.asarray(Image.open(path), dtype=dtype)


def test_ade20k_loads_through_datasetcatalog(synthetic_args, registered_root):
    expected = {ADE20K_SEM_SEG_CATEGORIES.index(names[0]) for names in CATEGORIES.values()}
    records = DatasetCatalog.get("ade20k_sem_seg_train")
    assert len(records) == synthetic_args["num_train"]
    assert len(DatasetCatalog.get("ade20k_sem_seg_val")) == synthetic_args["num_val"]
    shapes, seen = set(), set()
    for record in records:
        image = _read(record["file_name"])
        label = _read(record["sem_seg_file_name"])
        assert label.dtype == np.uint8 and image.shape == label.shape + (3,)
        assert 64 <= min(label.shape) and max(label.shape) <= 160
        values = set(np.unique(label).tolist())
        assert values <= expected | {255}
        shapes.add(label.shape)
        seen |= values
    assert len(shapes) > 1  # varied sizes and aspect ratios
    assert len(seen - {255}) >= 5


def test_coco_instances_load_through_datasetcatalog(synthetic_args, registered_root):
    thing_ids = {COCO_INDEX[names[1]] for names in CATEGORIES.values()
                 if COCO_CATEGORIES[COCO_INDEX[names[1]]]["isthing"]}
    records = DatasetCatalog.get("coco_2017_val")
    assert len(records) == synthetic_args["num_val"]
    assert len(DatasetCatalog.get("coco_2017_train")) == synthetic_args["num_train"]
    for record in records:
        assert _read(record["file_name"]).shape == (record["height"], record["width"], 3)
        assert len(record["annotations"]) >= 1
        for annotation in record["annotations"]:
            assert annotation["bbox_mode"] == BoxMode.XYWH_ABS
            assert annotation["iscrowd"] == 0
            # contiguous ids; COCO's thing ids 1..90 map to 0..79 in COCO_CATEGORIES order
            assert annotation["category_id"] in thing_ids
            polygons = annotation["segmentation"]
            assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)


def test_coco_instances_agree_with_panoptic(registered_root):
    """The instances json and the panoptic PNGs describe the same things."""
    import pycocotools.mask as mask_util
    from panopticapi.utils import rgb2id

    panoptic = {r["image_id"]: r for r in DatasetCatalog.get("coco_2017_val_panoptic")}
    for record in DatasetCatalog.get("coco_2017_val"):
        pan = panoptic[record["image_id"]]
        ids = rgb2id(_read(pan["pan_seg_file_name"], np.uint32))
        things = [s for s in pan["segments_info"] if s["isthing"]]
        assert sorted(a["category_id"] for a in record["annotations"]) == \
            sorted(s["category_id"] for s in things)
        h, w = record["height"], record["width"]
        for annotation in record["annotations"]:
            mask = mask_util.decode(mask_util.merge(
                mask_util.frPyObjects(annotation["segmentation"], h, w))).astype(bool)
            best = max(np.sum(mask & (ids == s["id"])) / np.sum(mask | (ids == s["id"]))
                       for s in things)
            assert best > 0.9


def test_lvis_annotates_the_coco_images(synthetic_args, registered_root):
    """LVIS v1's json over COCO's images: the same files (found through ``coco_url``) and things,
    with LVIS' category ids (contiguous in detectron2: id - 1) and verified-absent categories."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    lvis_index = {c["name"]: c["id"] - 1 for c in LVIS_CATEGORIES}
    coco_to_lvis = {COCO_INDEX[names[1]]: lvis_index[names[3]] for names in CATEGORIES.values() if names[3]}
    for split in ("val",):  # train is written by the same code
        coco = {r["image_id"]: r for r in DatasetCatalog.get(f"coco_2017_{split}")}
        records = DatasetCatalog.get(f"lvis_v1_{split}")
        assert len(records) == synthetic_args[f"num_{split}"]
        for record in records:
            twin = coco[record["image_id"]]
            assert record["file_name"] == twin["file_name"] and f"{split}2017" in record["file_name"]
            present = sorted(a["category_id"] for a in record["annotations"])
            assert present == sorted(coco_to_lvis[a["category_id"]] for a in twin["annotations"])
            assert not set(record["neg_category_ids"]) & {c + 1 for c in present}
            assert set(record["neg_category_ids"]) | {c + 1 for c in present} == {c + 1 for c in coco_to_lvis.values()}


def test_coco_panoptic_loads_through_datasetcatalog(synthetic_args, registered_root):
    from panopticapi.utils import rgb2id

    records = DatasetCatalog.get("coco_2017_train_panoptic")
    assert len(records) == synthetic_args["num_train"]
    kinds = set()
    for record in records:
        ids = rgb2id(_read(record["pan_seg_file_name"], np.uint32))
        segments = {s["id"]: s for s in record["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == set(segments)
        for segment_id, segment in segments.items():
            assert segment["area"] == int(np.sum(ids == segment_id))
            assert 0 <= segment["category_id"] < len(COCO_CATEGORIES)
            assert segment["isthing"] == bool(COCO_CATEGORIES[segment["category_id"]]["isthing"])
            kinds.add(segment["isthing"])
    assert kinds == {True, False}


def test_coco_panoptic_semseg_is_mask2formers_conversion(synthetic_args, registered_root):
    """panoptic_semseg_* holds, per pixel, the index of the segment's category in
    COCO_CATEGORIES and 255 for void, as Mask2Former's preparation script writes it."""
    from panopticapi.utils import rgb2id

    index_of_id = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    metadata = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    with open(metadata.panoptic_json) as f:
        raw = {a["file_name"]: a for a in json.load(f)["annotations"]}
    records = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert len(records) == synthetic_args["num_val"]
    for record in records:
        ids = rgb2id(_read(record["pan_seg_file_name"], np.uint32))
        expected = np.full(ids.shape, 255, dtype=np.uint8)
        for segment in raw[os.path.basename(record["pan_seg_file_name"])]["segments_info"]:
            expected[ids == segment["id"]] = index_of_id[segment["category_id"]]
        semantic = _read(record["sem_seg_file_name"])
        assert semantic.dtype == np.uint8
        np.testing.assert_array_equal(semantic, expected)


def _cityscapes_gt_files(root, split, suffix):
    return sorted(glob.glob(os.path.join(root, "cityscapes", "gtFine", split, "*",
                                         "*_gtFine_" + suffix)))


def test_cityscapes_semantic_loads_through_datasetcatalog(synthetic_args, registered_root):
    from cityscapesscripts.helpers.labels import id2label

    records = DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    assert len(records) == synthetic_args["num_train"]
    cities = {os.path.basename(os.path.dirname(r["file_name"])) for r in records}
    assert len(cities) > 1
    for record in records:
        train_ids = _read(record["sem_seg_file_name"])
        label_ids = _read(record["sem_seg_file_name"].replace("labelTrainIds", "labelIds"))
        assert train_ids.shape == (record["height"], record["width"]) == (128, 256)
        to_train_id = np.array([id2label[i].trainId if i in id2label else 255
                                for i in range(256)], dtype=np.uint8)
        np.testing.assert_array_equal(train_ids, to_train_id[label_ids])


def test_cityscapes_panoptic_loads_through_datasetcatalog(synthetic_args, registered_root):
    from panopticapi.utils import rgb2id

    metadata = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    thing_ids = set(metadata.thing_dataset_id_to_contiguous_id.values())
    records = DatasetCatalog.get("cityscapes_fine_panoptic_val")
    assert len(records) == synthetic_args["num_val"]
    for record in records:
        ids = rgb2id(_read(record["pan_seg_file_name"], np.uint32))
        segments = {s["id"]: s for s in record["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == set(segments)
        assert os.path.isfile(record["sem_seg_file_name"])
        things = [s for s in segments.values() if s["category_id"] in thing_ids]
        assert things and all(s["id"] >= 1000 for s in things)  # label id * 1000 + instance


def test_cityscapes_instances_from_instance_ids(synthetic_args, registered_root):
    """detectron2's Cityscapes instance loader, reading the *_instanceIds.png files."""
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    metadata = MetadataCatalog.get("cityscapes_fine_instance_seg_train")
    records = load_cityscapes_instances(metadata.image_dir, metadata.gt_dir, from_json=False,
                                        to_polygons=True)
    assert len(records) == synthetic_args["num_train"]
    annotations = [a for r in records for a in r["annotations"]]
    assert len(annotations) >= len(records)
    assert {a["category_id"] for a in annotations} <= set(range(len(metadata.thing_classes)))


def test_cityscapes_instance_seg_loads_through_datasetcatalog(synthetic_args, registered_root):
    """The registered name reads the polygons json, which needs shapely."""
    pytest.importorskip("shapely")
    records = DatasetCatalog.get("cityscapes_fine_instance_seg_val")
    assert len(records) == synthetic_args["num_val"]
    assert sum(len(r["annotations"]) for r in records) >= 1


def test_cityscapes_label_images_follow_the_polygons(synthetic_args, synthetic_root):
    """cityscapesscripts reads the polygons json, and what it rasterised (labelIds,
    instanceIds) is the scene that the image shows."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label

    label_id_of_kind = np.array([name2label[CATEGORIES[k.name][2]].id for k in KINDS]
                                + [name2label["static"].id])
    for split in ("train", "val"):
        count = synthetic_args["num_" + split]
        polygons = _cityscapes_gt_files(synthetic_root, split, "polygons.json")
        assert len(polygons) == count
        for path in polygons:
            index = int(os.path.basename(path).split("_")[2]) - 1
            scene, image = synthetic_sample(synthetic_args["seed"], "cityscapes", split, index)
            annotation = Annotation()
            annotation.fromJsonFile(path)
            assert (annotation.imgHeight, annotation.imgWidth) == (scene.height, scene.width)
            assert len(annotation.objects) == len(scene.regions)
            kind_map = scene.kind_map()
            label_ids = _read(path.replace("polygons.json", "labelIds.png"))
            np.testing.assert_array_equal(label_ids, label_id_of_kind[kind_map])
            instance_ids = _read(path.replace("polygons.json", "instanceIds.png"), np.int64)
            assert instance_ids.max() >= 24000  # 16-bit PNG, label id * 1000 + instance
            np.testing.assert_array_equal(np.where(instance_ids >= 1000, instance_ids // 1000,
                                                   instance_ids), label_ids)
            left = path.replace("gtFine", "leftImg8bit", 1).replace("_gtFine_polygons.json",
                                                                      "_leftImg8bit.png")
            np.testing.assert_array_equal(_read(left), image)  # lossless PNG
