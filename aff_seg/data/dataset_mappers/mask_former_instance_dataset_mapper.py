"""Training mapper for instance segmentation (``INPUT.DATASET_MAPPER_NAME: mask_former_instance``)."""
import copy
import logging

import torch
from detectron2.config import configurable
from detectron2.data import transforms as T

from .utils import (
    IMAGE_PAD_VALUE,
    annotation_segments,
    crop_and_colour_augmentations,
    pad_to_multiple,
    read_and_augment,
    require_training,
    segments_to_instances,
)

__all__ = ["MaskFormerInstanceDatasetMapper"]


class MaskFormerInstanceDatasetMapper:
    """Read an image and its instance annotations (polygons, RLE or binary masks), augment them
    (resize, plain random crop, colour, flip) and make one mask target per non-crowd instance.

    Output dict: ``image`` (3 x H x W uint8, padded with 128) and ``instances``
    (gt_classes, gt_masks padded with 0).
    """

    #: the metadata list the ``gt_classes`` of its targets index
    label_classes = "thing_classes"

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, size_divisibility):
        """
        Args:
            is_train: must be True; evaluation uses detectron2's ``DatasetMapper``.
            augmentations: list of detectron2 augmentations.
            image_format: format for ``read_image``.
            size_divisibility: pad to a multiple of this (<= 0: no padding).
        """
        require_training(self, is_train)
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        logging.getLogger(__name__).info(f"[{type(self).__name__}] augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": crop_and_colour_augmentations(cfg, category_area_constraint=False),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        if "annotations" not in dataset_dict:
            raise ValueError(f"{dataset_dict['file_name']}: no 'annotations' to train on")
        image, _, transforms, original_shape = read_and_augment(dataset_dict, self.image_format, self.augmentations)
        classes, masks = annotation_segments(dataset_dict.pop("annotations"), transforms, original_shape)
        image = pad_to_multiple(image, self.size_divisibility, IMAGE_PAD_VALUE)
        masks = [pad_to_multiple(torch.from_numpy(m), self.size_divisibility, False) for m in masks]
        dataset_dict["image"] = image
        dataset_dict["instances"] = segments_to_instances(classes, masks, tuple(image.shape[-2:]))
        return dataset_dict
