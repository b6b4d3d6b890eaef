"""Training mapper for semantic segmentation (``INPUT.DATASET_MAPPER_NAME: mask_former_semantic``)."""
import copy
import logging

import numpy as np
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

from .utils import (
    IMAGE_PAD_VALUE,
    crop_and_colour_augmentations,
    pad_to_multiple,
    read_and_augment,
    require_training,
    segments_to_instances,
)

__all__ = ["MaskFormerSemanticDatasetMapper"]


class MaskFormerSemanticDatasetMapper:
    """Read an image and its label map, augment both, and turn every class present into one
    mask target.

    Output dict: ``image`` (3 x H x W uint8, padded with 128 to a multiple of
    ``size_divisibility``), ``sem_seg`` (H x W int64, padded with ``ignore_label``) and
    ``instances`` (one mask per class in the crop, the ignore label excluded).
    """

    #: the metadata list the ``gt_classes`` of its targets index
    label_classes = "stuff_classes"

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, ignore_label, size_divisibility):
        """
        Args:
            is_train: must be True; evaluation uses detectron2's ``DatasetMapper``.
            augmentations: list of detectron2 augmentations, applied to image and label map.
            image_format: format for ``read_image`` (e.g. "RGB").
            ignore_label: label value that is no class (and pads the label map).
            size_divisibility: pad to a multiple of this (<= 0: no padding).
        """
        require_training(self, is_train)
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        logging.getLogger(__name__).info(f"[{type(self).__name__}] augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        return {
            "is_train": is_train,
            "augmentations": crop_and_colour_augmentations(cfg, category_area_constraint=True),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": meta.ignore_label,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def read_and_augment(self, dataset_dict):
        """Image and (optional) label map after augmentation, as tensors, plus the transforms.

        Returns (image 3 x H x W uint8, sem_seg H x W int64 or None, transforms), unpadded.
        """
        image, sem_seg, transforms, _ = read_and_augment(
            dataset_dict, self.image_format, self.augmentations, dataset_dict.pop("sem_seg_file_name", None))
        return image, sem_seg, transforms

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        if "annotations" in dataset_dict:
            raise ValueError(
                f"{dataset_dict['file_name']}: a semantic segmentation dataset has no 'annotations'"
            )
        if "sem_seg_file_name" not in dataset_dict:
            raise ValueError(f"{dataset_dict['file_name']}: no 'sem_seg_file_name' to train on")
        image, sem_seg, _ = self.read_and_augment(dataset_dict)
        image = pad_to_multiple(image, self.size_divisibility, IMAGE_PAD_VALUE)
        sem_seg = pad_to_multiple(sem_seg, self.size_divisibility, self.ignore_label)

        labels = sem_seg.numpy()
        classes = np.unique(labels)
        classes = classes[classes != self.ignore_label]
        dataset_dict["image"] = image
        dataset_dict["sem_seg"] = sem_seg
        dataset_dict["instances"] = segments_to_instances(
            classes, [labels == c for c in classes], tuple(image.shape[-2:])
        )
        return dataset_dict
