#!/usr/bin/env python
"""Write Cityscapes' derived label files with cityscapesscripts' own converters.

    python tools/datasets/prepare_cityscapes.py [--root $DETECTRON2_DATASETS]

* ``createTrainIdLabelImgs``: ``gtFine/*/*/*_gtFine_labelTrainIds.png`` (semantic, 19 classes);
* ``createPanopticImgs``: ``gtFine/cityscapes_panoptic_{train,val}.json`` and
  ``gtFine/cityscapes_panoptic_{train,val}/`` (panoptic).

Needs ``cityscapes/leftImg8bit`` and ``cityscapes/gtFine`` (with the polygon json files).
"""
import argparse
import os

SPLITS = ("train", "val")


def prepare(cityscapes_root, splits=SPLITS):
    from cityscapesscripts.preparation import createPanopticImgs, createTrainIdLabelImgs

    gt_fine = os.path.join(cityscapes_root, "gtFine")
    if not os.path.isdir(gt_fine):
        raise FileNotFoundError(f"{gt_fine} not found: download gtFine and leftImg8bit into {cityscapes_root}")
    previous = os.environ.get("CITYSCAPES_DATASET")
    os.environ["CITYSCAPES_DATASET"] = cityscapes_root  # where createTrainIdLabelImgs looks
    try:
        createTrainIdLabelImgs.main()
    finally:
        if previous is None:
            os.environ.pop("CITYSCAPES_DATASET")
        else:
            os.environ["CITYSCAPES_DATASET"] = previous
    createPanopticImgs.convert2panoptic(gt_fine, gt_fine, setNames=list(splits))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    args = parser.parse_args(argv)
    prepare(os.path.abspath(os.path.join(args.root, "cityscapes")))


if __name__ == "__main__":
    main()
