"""Small, seeded synthetic datasets in the exact on-disk formats of ADE20K, COCO and Cityscapes.

``make_synthetic_datasets(root)`` writes, under a ``DETECTRON2_DATASETS`` folder, the files that
detectron2's built-in registrations (and this project's, ``aff_seg.data.datasets``) read, so the
standard names (``ade20k_sem_seg_train``, ``coco_2017_val``, ``coco_2017_train_panoptic``,
``coco_2017_val_panoptic_with_sem_seg``, ``cityscapes_fine_panoptic_train`` ...) load them
through ``DatasetCatalog`` and the real configs run unchanged::

    ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ADEChallengeData2016/annotations_detectron2/{training,validation}/ADE_*.png  uint8, 255 = ignore
    coco/{train2017,val2017}/*.jpg
    coco/annotations/instances_{train,val}2017.json        polygons, COCO's 80 thing ids
    coco/annotations/panoptic_{train,val}2017.json + coco/panoptic_{train,val}2017/*.png
    coco/panoptic_semseg_{train,val}2017/*.png              index into COCO_CATEGORIES, 255 = void
    cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_<frame>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/..._gtFine_{polygons.json,labelIds,instanceIds,color,
                                                      labelTrainIds}.png
    cityscapes/gtFine/cityscapes_panoptic_{train,val}.json + cityscapes_panoptic_{train,val}/

Every image shows one *scene* from a single generator (``scene.make_scene``); each dataset names
the same kinds in its own vocabulary (``CATEGORIES``).  One writer per format (``ade20k``,
``coco``, ``cityscapes``); Cityscapes' label PNGs and panoptic files are produced by
cityscapesscripts' own converters from the polygon json files, as for the real dataset.

``evaluate_ground_truth(root)`` feeds the ground truth back as predictions through detectron2's
evaluators (mIoU, AP, PQ are then 100), which checks every format end to end.
"""
from .evaluation import evaluate_ground_truth
from .scene import CATEGORIES, DATASETS, KINDS, VOID, Scene, make_scene, render_image, synthetic_sample
from .write import make_synthetic_datasets

__all__ = [
    "CATEGORIES",
    "DATASETS",
    "KINDS",
    "VOID",
    "Scene",
    "evaluate_ground_truth",
    "make_scene",
    "make_synthetic_datasets",
    "render_image",
    "synthetic_sample",
]
