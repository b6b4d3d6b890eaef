"""Large-scale-jitter training mapper for COCO instance segmentation
(``INPUT.DATASET_MAPPER_NAME: coco_instance_lsj``)."""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .utils import large_scale_jitter_augmentations

__all__ = ["COCOInstanceNewBaselineDatasetMapper"]


class COCOInstanceNewBaselineDatasetMapper:
    """Flip, rescale (LSJ) and crop/pad to a fixed square; one mask target per non-crowd
    instance that survives the crop.

    Output dict: ``image`` (3 x S x S uint8, S = INPUT.IMAGE_SIZE) and ``instances``
    (gt_classes, gt_boxes tight around the cropped masks, gt_masks S x S).
    """

    @configurable
    def __init__(self, is_train=True, *, tfm_gens, image_format):
        """
        Args:
            is_train: False only strips annotations (evaluation normally uses ``DatasetMapper``).
            tfm_gens: list of detectron2 augmentations (see ``large_scale_jitter_augmentations``).
            image_format: format for ``read_image``.
        """
        self.is_train = is_train
        self.tfm_gens = tfm_gens
        self.image_format = image_format
        logging.getLogger(__name__).info(f"[{type(self).__name__}] augmentations: {tfm_gens}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "tfm_gens": large_scale_jitter_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        image, transforms = T.apply_transform_gens(self.tfm_gens, image)
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train or annotations is None:
            return dataset_dict

        annos = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annos, image_shape, mask_format="bitmask")
        if not instances.has("gt_masks"):
            instances.gt_masks = torch.zeros((0, *image_shape), dtype=torch.bool)
        else:
            # the crop cuts boxes: make them tight around what is left of each mask
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
            instances = utils.filter_empty_instances(instances)
            instances.gt_masks = instances.gt_masks.tensor
        dataset_dict["instances"] = instances
        return dataset_dict
