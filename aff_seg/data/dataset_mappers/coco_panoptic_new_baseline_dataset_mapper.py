"""Large-scale-jitter training mapper for COCO panoptic segmentation
(``INPUT.DATASET_MAPPER_NAME: coco_panoptic_lsj``)."""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks
from panopticapi.utils import rgb2id

from .utils import large_scale_jitter_augmentations, panoptic_segments, segments_to_instances

__all__ = ["COCOPanopticNewBaselineDatasetMapper"]


class COCOPanopticNewBaselineDatasetMapper:
    """Flip, rescale (LSJ) and crop/pad to a fixed square; one mask target per non-crowd
    segment of the panoptic PNG.

    Output dict: ``image`` (3 x S x S uint8) and ``instances`` (gt_classes, gt_masks S x S,
    gt_boxes around each mask).
    """

    @configurable
    def __init__(self, is_train=True, *, tfm_gens, image_format):
        """
        Args:
            is_train: False returns the image only (evaluation normally uses ``DatasetMapper``).
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
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(f"{dataset_dict['file_name']}: no 'pan_seg_file_name' to train on")

        pan_seg = utils.read_image(dataset_dict.pop("pan_seg_file_name"), "RGB")
        pan_seg = rgb2id(transforms.apply_segmentation(pan_seg))
        classes, masks = panoptic_segments(pan_seg, dataset_dict["segments_info"])
        instances = segments_to_instances(classes, masks, image_shape)
        instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
        dataset_dict["instances"] = instances
        return dataset_dict
