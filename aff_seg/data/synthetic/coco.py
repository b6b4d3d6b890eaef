"""COCO's files: images, instance polygons, panoptic PNGs + json, and the panoptic-derived
semantic PNGs (index into detectron2's ``COCO_CATEGORIES``, 255 = void)."""
import os

import numpy as np

from .files import FORMAT_VERSION, save_jpg, save_png, write_json
from .scene import CATEGORIES, KINDS, VOID

__all__ = ["write_coco"]


def _mask_to_coco_polygons(mask, upsample=4):
    """COCO polygons (``[[x0, y0, x1, y1, ...], ...]``) outlining each part of a binary mask.

    The outlines are traced on a ``upsample`` times finer grid, so they follow pixel edges
    rather than pixel centres: pycocotools rasterises them back to the mask up to a few
    pixels.  Holes (a thing lying inside another) are not cut out, as in COCO's own polygons.
    """
    import cv2

    fine = np.kron(mask.astype(np.uint8), np.ones((upsample, upsample), dtype=np.uint8))
    contours, _ = cv2.findContours(fine, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [((c.reshape(-1, 2) + 0.5) / upsample).ravel().tolist() for c in contours]


def _box_xywh(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1)]


def write_coco(folder, samples, image_id_offsets):
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from panopticapi.utils import id2rgb

    index_of = {c["name"]: i for i, c in enumerate(COCO_CATEGORIES)}
    category_of_kind = [COCO_CATEGORIES[index_of[CATEGORIES[k.name][1]]] for k in KINDS]
    semantic_of_kind = np.array([index_of[CATEGORIES[k.name][1]] for k in KINDS] + [255],
                                dtype=np.uint8)  # [-1] = VOID
    thing_categories = [{"id": c["id"], "name": c["name"], "supercategory": "thing"}
                        for c in COCO_CATEGORIES if c["isthing"]]
    panoptic_categories = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"],
                            "color": c["color"],
                            "supercategory": "thing" if c["isthing"] else "stuff"}
                           for c in COCO_CATEGORIES]
    os.makedirs(os.path.join(folder, "annotations"))
    for split, items in samples.items():
        image_dir = os.path.join(folder, f"{split}2017")
        panoptic_dir = os.path.join(folder, f"panoptic_{split}2017")
        semseg_dir = os.path.join(folder, f"panoptic_semseg_{split}2017")
        for d in (image_dir, panoptic_dir, semseg_dir):
            os.makedirs(d)
        images, instances, panoptic = [], [], []
        for index, (scene, image) in enumerate(items):
            image_id = image_id_offsets[split] + index + 1
            stem = f"{image_id:012d}"
            save_jpg(image, os.path.join(image_dir, stem + ".jpg"))
            images.append({"id": image_id, "file_name": stem + ".jpg",
                           "height": scene.height, "width": scene.width})

            segment_map = np.zeros(scene.region_map.shape, dtype=np.uint32)  # 0 = void
            segments, stuff_masks, count = [], {}, {}
            for region, (kind, _) in enumerate(scene.regions):
                if kind == VOID:
                    continue
                mask = scene.region_map == region
                if not mask.any():
                    continue
                if not KINDS[kind].is_thing:  # one segment per stuff class
                    stuff_masks[kind] = stuff_masks.get(kind, False) | mask
                    continue
                segments.append((kind, mask))
                area = int(mask.sum())
                instances.append({
                    "id": len(instances) + 1, "image_id": image_id,
                    "category_id": category_of_kind[kind]["id"],
                    "segmentation": _mask_to_coco_polygons(mask),
                    "area": area, "bbox": _box_xywh(mask), "iscrowd": 0,
                })
            segments = sorted(stuff_masks.items()) + segments
            segments_info = []
            for kind, mask in segments:
                category_id = category_of_kind[kind]["id"]
                count[category_id] = count.get(category_id, 0) + 1
                segment_id = category_id * 1000 + count[category_id]
                segment_map[mask] = segment_id
                segments_info.append({"id": segment_id, "category_id": category_id,
                                      "area": int(mask.sum()), "bbox": _box_xywh(mask),
                                      "iscrowd": 0})
            save_png(id2rgb(segment_map), os.path.join(panoptic_dir, stem + ".png"))
            save_png(semantic_of_kind[scene.kind_map()], os.path.join(semseg_dir, stem + ".png"))
            panoptic.append({"image_id": image_id, "file_name": stem + ".png",
                             "segments_info": segments_info})
        info = {"description": "aff_seg synthetic COCO", "version": str(FORMAT_VERSION)}
        write_json({"info": info, "licenses": [], "images": images, "annotations": instances,
                     "categories": thing_categories},
                    os.path.join(folder, "annotations", f"instances_{split}2017.json"))
        write_json({"info": info, "licenses": [], "images": images, "annotations": panoptic,
                     "categories": panoptic_categories},
                    os.path.join(folder, "annotations", f"panoptic_{split}2017.json"))
