#!/usr/bin/env python
"""Write small synthetic ADE20K / COCO / Cityscapes datasets in their real on-disk formats.

    python tools/make_synthetic_datasets.py --root datasets_synthetic
    DETECTRON2_DATASETS=datasets_synthetic python train_net.py --config-file configs/...

With DETECTRON2_DATASETS pointing at --root, the standard dataset names (ade20k_sem_seg_train,
coco_2017_train, coco_2017_val_panoptic_with_sem_seg, cityscapes_fine_panoptic_train ...) load
these files.  A second run with the same arguments returns at once.  See aff_seg/data/synthetic/.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aff_seg  # noqa: E402,F401  (detectron2 compatibility fixes first)
from aff_seg.data.synthetic import (  # noqa: E402
    DATASETS,
    evaluate_ground_truth,
    make_synthetic_datasets,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="folder to write into (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)} (default: all)")
    parser.add_argument("--num-train", type=int, default=24, help="images per train split")
    parser.add_argument("--num-val", type=int, default=8, help="images per val split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=64, help="ADE20K/COCO smallest side")
    parser.add_argument("--max-side", type=int, default=160, help="ADE20K/COCO largest side")
    parser.add_argument("--cityscapes-size", type=int, nargs=2, default=(128, 256),
                        metavar=("H", "W"), help="Cityscapes image size")
    parser.add_argument("--evaluate", action="store_true",
                        help="then score the val ground truth with detectron2's evaluators")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    folders = make_synthetic_datasets(
        args.root, datasets, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
        min_side=args.min_side, max_side=args.max_side, cityscapes_size=args.cityscapes_size)
    for dataset, folder in folders.items():
        print(f"{dataset}: {folder}")
    if args.evaluate:
        evaluate_ground_truth(args.root, datasets)


if __name__ == "__main__":
    main()
