"""ADE20K's files: ``images/{training,validation}/*.jpg`` and
``annotations_detectron2/{training,validation}/*.png`` (uint8 class index, 255 = ignore)."""
import os

import numpy as np

from .files import save_jpg, save_png
from .scene import CATEGORIES, KINDS

__all__ = ["write_ade20k"]


def write_ade20k(folder, samples):
    from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

    label_of_kind = np.array([ADE20K_SEM_SEG_CATEGORIES.index(CATEGORIES[k.name][0])
                              for k in KINDS] + [255], dtype=np.uint8)  # [-1] = VOID
    for split, items in samples.items():
        dirname = {"train": "training", "val": "validation"}[split]
        image_dir = os.path.join(folder, "images", dirname)
        label_dir = os.path.join(folder, "annotations_detectron2", dirname)
        os.makedirs(image_dir)
        os.makedirs(label_dir)
        for index, (scene, image) in enumerate(items):
            stem = f"ADE_{split}_{index + 1:08d}"
            save_jpg(image, os.path.join(image_dir, stem + ".jpg"))
            save_png(label_of_kind[scene.kind_map()], os.path.join(label_dir, stem + ".png"))
