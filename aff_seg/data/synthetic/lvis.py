"""LVIS v1's files: ``lvis/lvis_v1_{train,val}.json`` (instance polygons with LVIS category ids)
over COCO's images, which LVIS does not copy: each image names its file by ``coco_url``
(``.../{train,val}2017/<id>.jpg``), found under ``coco/`` (written by ``write_coco`` from the
same scenes)."""
import os

from .coco import _box_xywh, _mask_to_coco_polygons
from .files import FORMAT_VERSION, write_json
from .scene import CATEGORIES, KINDS, VOID

__all__ = ["write_lvis"]


def write_lvis(folder, samples, image_id_offsets):
    """Write the LVIS json files of the COCO ``samples`` (``{split: [(scene, image)]}``, the
    image ids of ``write_coco``: ``image_id_offsets[split] + index + 1``) into ``folder``."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    id_of = {c["name"]: c["id"] for c in LVIS_CATEGORIES}
    category_of_kind = [id_of[CATEGORIES[k.name][3]] if k.is_thing else None for k in KINDS]
    for split, items in samples.items():
        images, annotations = [], []
        image_count, instance_count = {}, {}
        for index, (scene, _) in enumerate(items):
            image_id = image_id_offsets[split] + index + 1
            present = set()
            for region, (kind, _) in enumerate(scene.regions):
                if kind == VOID or category_of_kind[kind] is None:
                    continue
                mask = scene.region_map == region
                # detectron2's LVIS loader takes only polygons of 3 or more points
                polygons = [p for p in _mask_to_coco_polygons(mask) if len(p) >= 6] if mask.any() else []
                if not polygons:
                    continue
                category_id = category_of_kind[kind]
                present.add(category_id)
                instance_count[category_id] = instance_count.get(category_id, 0) + 1
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                    "segmentation": polygons, "area": int(mask.sum()),
                    "bbox": _box_xywh(mask),
                })
            for category_id in present:
                image_count[category_id] = image_count.get(category_id, 0) + 1
            # LVIS' per-image verification: the thing kinds not in the image are known absent
            absent = sorted({c for c in category_of_kind if c is not None} - present)
            images.append({
                "id": image_id, "height": scene.height, "width": scene.width,
                "coco_url": f"http://images.cocodataset.org/{split}2017/{image_id:012d}.jpg",
                "neg_category_ids": absent, "not_exhaustive_category_ids": [],
            })
        categories = [dict(c, image_count=image_count.get(c["id"], 0), instance_count=instance_count.get(c["id"], 0))
                      for c in LVIS_CATEGORIES]
        info = {"description": "aff_seg synthetic LVIS v1", "version": str(FORMAT_VERSION)}
        write_json({"info": info, "licenses": [], "images": images, "annotations": annotations,
                    "categories": categories}, os.path.join(folder, f"lvis_v1_{split}.json"))
