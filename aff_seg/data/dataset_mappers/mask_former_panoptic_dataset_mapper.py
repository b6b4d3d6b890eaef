"""Training mapper for panoptic segmentation (``INPUT.DATASET_MAPPER_NAME: mask_former_panoptic``)."""
import copy

import torch
from detectron2.config import configurable
from panopticapi.utils import rgb2id

from .mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper
from .utils import IMAGE_PAD_VALUE, pad_to_multiple, panoptic_segments, read_label_map, segments_to_instances

__all__ = ["MaskFormerPanopticDatasetMapper"]


class MaskFormerPanopticDatasetMapper(MaskFormerSemanticDatasetMapper):
    """Like the semantic mapper, but the mask targets are the non-crowd segments of the panoptic
    PNG (``pan_seg_file_name`` + ``segments_info``), one per thing instance or stuff region.

    Output dict: ``image``, ``sem_seg`` (if the dataset has one) and ``instances``; the panoptic
    map is padded with 0 (VOID).
    """

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, ignore_label, size_divisibility):
        super().__init__(
            is_train,
            augmentations=augmentations,
            image_format=image_format,
            ignore_label=ignore_label,
            size_divisibility=size_divisibility,
        )

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        if "annotations" in dataset_dict:
            raise ValueError(
                f"{dataset_dict['file_name']}: a panoptic dataset gives 'segments_info', not 'annotations'"
            )
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(f"{dataset_dict['file_name']}: no 'pan_seg_file_name' to train on")
        pan_seg_file_name = dataset_dict.pop("pan_seg_file_name")
        image, sem_seg, transforms = self.read_and_augment(dataset_dict)  # sets height/width
        pan_seg = read_label_map(pan_seg_file_name, dataset_dict, "RGB")
        pan_seg = torch.as_tensor(rgb2id(transforms.apply_segmentation(pan_seg)).astype("long"))

        image = pad_to_multiple(image, self.size_divisibility, IMAGE_PAD_VALUE)
        pan_seg = pad_to_multiple(pan_seg, self.size_divisibility, 0)
        dataset_dict["image"] = image
        if sem_seg is not None:
            dataset_dict["sem_seg"] = pad_to_multiple(sem_seg, self.size_divisibility, self.ignore_label)
        classes, masks = panoptic_segments(pan_seg.numpy(), dataset_dict["segments_info"])
        dataset_dict["instances"] = segments_to_instances(classes, masks, tuple(image.shape[-2:]))
        return dataset_dict
