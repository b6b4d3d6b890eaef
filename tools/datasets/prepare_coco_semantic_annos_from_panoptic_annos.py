#!/usr/bin/env python
"""Write COCO's semantic label maps from the panoptic annotations:
``coco/panoptic_semseg_{train,val}2017/*.png``.

    python tools/datasets/prepare_coco_semantic_annos_from_panoptic_annos.py [--root ...] [--workers N]

Each pixel gets the index of its segment's category in detectron2's ``COCO_CATEGORIES``
(0..132, things and stuff together, the contiguous ids of ``coco_2017_*_panoptic_with_sem_seg``);
unlabelled pixels get 255.
"""
import argparse
import json
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image

SPLITS = ("train2017", "val2017")


def semantic_from_panoptic(panoptic_png, segments_info, contiguous_id):
    """``h x w`` uint8 semantic map of one panoptic PNG (RGB-encoded segment ids)."""
    rgb = np.asarray(Image.open(panoptic_png), dtype=np.uint32)
    segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    semantic = np.full(segment_ids.shape, 255, dtype=np.uint8)
    for segment in segments_info:
        semantic[segment_ids == segment["id"]] = contiguous_id[segment["category_id"]]
    return semantic


def _convert_one(job):
    panoptic_png, segments_info, contiguous_id, output_png = job
    Image.fromarray(semantic_from_panoptic(panoptic_png, segments_info, contiguous_id)).save(output_png)


def convert_split(coco_root, split, workers=4):
    """Convert one split; returns the number of label maps written."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    contiguous_id = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    with open(os.path.join(coco_root, "annotations", f"panoptic_{split}.json")) as f:
        annotations = json.load(f)["annotations"]
    panoptic_dir = os.path.join(coco_root, f"panoptic_{split}")
    output_dir = os.path.join(coco_root, f"panoptic_semseg_{split}")
    os.makedirs(output_dir, exist_ok=True)
    jobs = [
        (os.path.join(panoptic_dir, a["file_name"]), a["segments_info"], contiguous_id,
         os.path.join(output_dir, a["file_name"]))
        for a in annotations
    ]
    if workers > 1:
        with Pool(workers) as pool:
            pool.map(_convert_one, jobs, chunksize=64)
    else:
        for job in jobs:
            _convert_one(job)
    return len(jobs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    import aff_seg  # noqa: F401  (detectron2 compat fixes before its import)

    coco = os.path.join(args.root, "coco")
    for split in SPLITS:
        count = convert_split(coco, split, args.workers)
        print(f"{split}: {count} semantic label maps written to {os.path.join(coco, f'panoptic_semseg_{split}')}")


if __name__ == "__main__":
    main()
