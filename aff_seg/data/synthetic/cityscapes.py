"""Cityscapes' files: images and polygon json files, rasterised and converted to label, instance
and panoptic files by cityscapesscripts' own preparation scripts, as for the real dataset."""
import contextlib
import io
import os

import numpy as np

from .files import save_png, write_json
from .scene import CATEGORIES, KINDS

__all__ = ["write_cityscapes"]

_CITYSCAPES_VOID_LABEL = "static"
_CITYSCAPES_CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau")}


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_cityscapes(folder, samples):
    from cityscapesscripts.preparation import createPanopticImgs, createTrainIdLabelImgs
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    label_of_kind = [CATEGORIES[k.name][2] for k in KINDS] + [_CITYSCAPES_VOID_LABEL]
    for split, items in samples.items():
        cities = _CITYSCAPES_CITIES[split]
        for index, (scene, image) in enumerate(items):
            city = cities[index % len(cities)]
            image_dir = os.path.join(folder, "leftImg8bit", split, city)
            gt_dir = os.path.join(folder, "gtFine", split, city)
            os.makedirs(image_dir, exist_ok=True)
            os.makedirs(gt_dir, exist_ok=True)
            stem = f"{city}_000000_{index + 1:06d}"
            save_png(image, os.path.join(image_dir, stem + "_leftImg8bit.png"))
            annotation = {
                "imgHeight": scene.height, "imgWidth": scene.width,
                "objects": [{"label": label_of_kind[kind], "polygon": [list(p) for p in polygon]}
                            for kind, polygon in scene.regions],
            }
            gt = os.path.join(gt_dir, stem + "_gtFine_")
            write_json(annotation, gt + "polygons.json")
            # the raw label images, rasterised from the polygons like the real dataset's
            json2labelImg(gt + "polygons.json", gt + "labelIds.png", "ids")
            json2labelImg(gt + "polygons.json", gt + "color.png", "color")
            # json2instanceImg saves a 32-bit "I" image, which Pillow >= 11 cannot write as PNG;
            # the real files are 16-bit PNGs: rasterise with cityscapesscripts, save as 16 bit
            polygons = Annotation()
            polygons.fromJsonFile(gt + "polygons.json")
            instance_ids = np.asarray(createInstanceImage(polygons, "ids"), dtype=np.uint16)
            save_png(instance_ids, gt + "instanceIds.png")
    # then the preparation steps users run on the real dataset
    with contextlib.redirect_stdout(io.StringIO()), _environ(CITYSCAPES_DATASET=folder):
        createTrainIdLabelImgs.main()
        gt_fine = os.path.join(folder, "gtFine")
        createPanopticImgs.convert2panoptic(gt_fine, gt_fine, setNames=list(samples))
