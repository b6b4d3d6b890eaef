#!/usr/bin/env python
"""Write ADE20K's detectron2 label maps: ``ADEChallengeData2016/annotations_detectron2/``.

    python tools/datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS]

ADE20K's PNGs use 0 for "other" and 1..150 for the classes; detectron2's ``ade20k_sem_seg_*``
read labels 0..149 with 255 ignored, so every label is shifted down by one (0 wraps to 255).
"""
import argparse
import glob
import os

import numpy as np
from PIL import Image

SPLITS = ("training", "validation")


def convert(annotation_png, output_png):
    """Shift one ADE20K label map: label - 1, with 0 ("other") becoming 255."""
    labels = np.asarray(Image.open(annotation_png), dtype=np.uint8)
    Image.fromarray(labels - np.uint8(1)).save(output_png)  # uint8 arithmetic: 0 - 1 = 255


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    args = parser.parse_args(argv)
    ade = os.path.join(args.root, "ADEChallengeData2016")
    for split in SPLITS:
        source = os.path.join(ade, "annotations", split)
        target = os.path.join(ade, "annotations_detectron2", split)
        files = sorted(glob.glob(os.path.join(source, "*.png")))
        if not files:
            raise FileNotFoundError(f"no label PNGs in {source}: download ADEChallengeData2016 into {ade}")
        os.makedirs(target, exist_ok=True)
        for path in files:
            convert(path, os.path.join(target, os.path.basename(path)))
        print(f"{split}: {len(files)} label maps written to {target}")


if __name__ == "__main__":
    main()
