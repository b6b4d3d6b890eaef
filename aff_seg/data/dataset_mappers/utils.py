"""Pieces shared by the Mask2Former training mappers: augmentation lists, padding, targets.

Every mapper turns one detectron2 dataset dict into ``{"image": 3 x H x W uint8 tensor,
"instances": Instances(gt_classes: k, gt_masks: k x H x W bool/uint8), ...}``; what differs is
where the k segments come from (a label map, annotations or a panoptic PNG).
"""
import copy
import logging

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.data.detection_utils import check_image_size, read_image
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

__all__ = [
    "IMAGE_PAD_VALUE",
    "crop_and_colour_augmentations",
    "large_scale_jitter_augmentations",
    "read_and_augment",
    "pad_to_multiple",
    "read_label_map",
    "segments_to_instances",
    "panoptic_segments",
    "annotation_segments",
]

# grey, as upstream: the value an image is padded with before normalisation
IMAGE_PAD_VALUE = 128


def crop_and_colour_augmentations(cfg, category_area_constraint):
    """Resize the short side, random crop, SSD colour jitter, horizontal flip (cfg.INPUT.*).

    ``category_area_constraint``: crop with ``RandomCrop_CategoryAreaConstraint`` (semantic and
    panoptic mappers, which see a label map) instead of a plain ``RandomCrop`` (instance mapper).
    """
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        if category_area_constraint:
            augs.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                )
            )
        else:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augs.append(T.RandomFlip())
    return augs


def large_scale_jitter_augmentations(cfg):
    """LSJ: flip, rescale by a factor in [MIN_SCALE, MAX_SCALE] of IMAGE_SIZE, fixed square crop/pad."""
    size = cfg.INPUT.IMAGE_SIZE
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    augs.append(
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=size,
            target_width=size,
        )
    )
    augs.append(T.FixedSizeCrop(crop_size=(size, size), pad_value=IMAGE_PAD_VALUE))
    return augs


def require_training(mapper, is_train):
    """Every mapper here is a training mapper (evaluation uses detectron2's ``DatasetMapper``):
    ``is_train=False`` is refused, naming the mapper."""
    if not is_train:
        raise ValueError(f"{type(mapper).__name__} is a training mapper; got is_train=False "
                         "(evaluation uses detectron2's DatasetMapper)")


class LargeScaleJitterMapper:
    """What the two LSJ mappers (``coco_instance_lsj``, ``coco_panoptic_lsj``) share: read the
    image, apply the large-scale-jitter augmentations; subclasses add their targets."""

    #: the metadata list the ``gt_classes`` of its targets index (panoptic: every class)
    label_classes = "stuff_classes"

    @configurable
    def __init__(self, is_train=True, *, tfm_gens, image_format):
        """
        Args:
            is_train: must be True; evaluation uses detectron2's ``DatasetMapper``.
            tfm_gens: list of detectron2 augmentations (see ``large_scale_jitter_augmentations``).
            image_format: format for ``read_image``.
        """
        require_training(self, is_train)
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

    def read_and_augment(self, dataset_dict):
        """A copy of ``dataset_dict`` with ``image`` (3 x S x S uint8), the applied transforms and
        the original image's (height, width)."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image, _, transforms, original_shape = read_and_augment(
            dataset_dict, self.image_format, T.AugmentationList(self.tfm_gens))
        dataset_dict["image"] = image
        return dataset_dict, transforms, original_shape


def read_and_augment(dataset_dict, image_format, augmentations, sem_seg_file_name=None):
    """Read ``dataset_dict``'s image (checked against its height/width, which are set if missing)
    and, if given, its label map, and augment both.

    Args:
        image_format: format for ``read_image`` (e.g. "RGB").
        augmentations: a ``T.AugmentationList``.
        sem_seg_file_name: the class-id map to read and augment with the image, or None.
    Returns:
        (image ``3 x H x W`` uint8 tensor, sem_seg ``H x W`` int64 tensor or None, the applied
        transforms, the original image's (height, width)), unpadded.
    """
    image = read_image(dataset_dict["file_name"], format=image_format)
    check_image_size(dataset_dict, image)
    original_shape = image.shape[:2]
    sem_seg = None
    if sem_seg_file_name is not None:
        sem_seg = read_label_map(sem_seg_file_name, dataset_dict).astype("double")
    aug_input = T.AugInput(image, sem_seg=sem_seg)
    transforms = augmentations(aug_input)
    image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
    if sem_seg is not None:
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype("long"))
    return image, sem_seg, transforms, original_shape


def read_label_map(path, dataset_dict, format=None):
    """Read the label map ``path`` of ``dataset_dict``'s image, checked before any augmentation.

    Args:
        format: None for a class-id map (must be single-channel, H x W), "RGB" for a panoptic
            PNG (H x W x 3).
    Raises:
        ValueError: naming ``path`` (and the image) when the channels or the size do not fit.
    """
    label = read_image(path, format)
    if format is None and label.ndim != 2:
        raise ValueError(f"{path}: a label map must have one channel (class ids), got shape {label.shape}")
    size = (dataset_dict.get("height"), dataset_dict.get("width"))
    if None not in size and tuple(label.shape[:2]) != size:
        raise ValueError(
            f"{path}: label map of {label.shape[0]} x {label.shape[1]} pixels for the image "
            f"{dataset_dict.get('file_name')} of {size[0]} x {size[1]}"
        )
    return label


def pad_to_multiple(tensor, divisibility, value):
    """Pad the last two dims of ``tensor`` (... x H x W) on the right/bottom to a multiple of
    ``divisibility`` with ``value``; ``divisibility <= 0`` returns it unchanged.

    With the shipped configs (crop 512, SIZE_DIVISIBILITY 512) this pads to exactly 512 x 512.
    """
    if divisibility <= 0:
        return tensor
    h, w = tensor.shape[-2:]
    pad_h = -h % divisibility
    pad_w = -w % divisibility
    if pad_h == 0 and pad_w == 0:
        return tensor
    return F.pad(tensor, [0, pad_w, 0, pad_h], value=value).contiguous()


def segments_to_instances(classes, masks, image_shape):
    """Instances of ``image_shape`` (h, w) with gt_classes (k, int64) and gt_masks (k x h x w).

    ``masks``: a list of k boolean h x w arrays or tensors.
    """
    instances = Instances(image_shape)
    instances.gt_classes = torch.as_tensor(np.asarray(classes, dtype=np.int64).reshape(-1))
    if len(masks) == 0:
        instances.gt_masks = torch.zeros((0, *image_shape), dtype=torch.bool)
    else:
        stacked = torch.stack([torch.as_tensor(np.ascontiguousarray(m)) for m in masks])
        instances.gt_masks = BitMasks(stacked).tensor
    return instances


def panoptic_segments(pan_seg_ids, segments_info):
    """(classes, masks) of the non-crowd segments of a panoptic id map (h x w int array)."""
    classes, masks = [], []
    for segment in segments_info:
        if segment.get("iscrowd", 0):
            continue
        classes.append(segment["category_id"])
        masks.append(pan_seg_ids == segment["id"])
    return classes, masks


def _rasterise(segmentation, height, width):
    if isinstance(segmentation, list):  # polygons
        return polygons_to_bitmask(segmentation, height, width)
    if isinstance(segmentation, dict):  # RLE, compressed or not
        if isinstance(segmentation["counts"], list):
            segmentation = mask_util.frPyObjects(segmentation, height, width)
        return mask_util.decode(segmentation).astype(bool)
    if isinstance(segmentation, np.ndarray) and segmentation.ndim == 2:
        return segmentation.astype(bool)
    raise ValueError(
        f"segmentation must be polygons, COCO RLE or an h x w array, got {type(segmentation).__name__}"
    )


def annotation_segments(annotations, transforms, original_shape):
    """(classes, masks) of the non-crowd instance annotations after ``transforms``.

    Each segmentation (polygons, RLE or a binary array) is rasterised at the original image
    size and the mask is transformed like a label map, so cropping needs no polygon clipping
    (fvcore's polygon crop requires shapely).

    Args:
        annotations: detectron2 annotation dicts with "segmentation" and "category_id".
        transforms: the ``TransformList`` applied to the image.
        original_shape: (h, w) of the image before ``transforms``.
    Returns:
        (list of class ids, list of boolean masks of the transformed image size).
    """
    classes, masks = [], []
    for obj in annotations:
        if obj.get("iscrowd", 0):
            continue
        mask = _rasterise(obj["segmentation"], *original_shape).astype(np.uint8)
        classes.append(int(obj["category_id"]))
        masks.append(transforms.apply_segmentation(mask).astype(bool))
    return classes, masks
