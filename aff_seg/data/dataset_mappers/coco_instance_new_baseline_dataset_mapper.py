"""Large-scale-jitter training mapper for COCO instance segmentation
(``INPUT.DATASET_MAPPER_NAME: coco_instance_lsj``)."""
from detectron2.structures import BitMasks

from .utils import LargeScaleJitterMapper, annotation_segments, segments_to_instances

__all__ = ["COCOInstanceNewBaselineDatasetMapper"]


class COCOInstanceNewBaselineDatasetMapper(LargeScaleJitterMapper):
    """Flip, rescale (LSJ) and crop/pad to a fixed square; one mask target per non-crowd
    instance that survives the crop.

    Output dict: ``image`` (3 x S x S uint8, S = INPUT.IMAGE_SIZE) and ``instances``
    (gt_classes, gt_masks S x S, gt_boxes tight around the cropped masks).
    """

    label_classes = "thing_classes"

    def __call__(self, dataset_dict):
        dataset_dict, transforms, original_shape = self.read_and_augment(dataset_dict)
        image_shape = dataset_dict["image"].shape[1:]
        if "annotations" not in dataset_dict:
            raise ValueError(f"{dataset_dict['file_name']}: no 'annotations' to train on")
        classes, masks = annotation_segments(dataset_dict.pop("annotations"), transforms, original_shape)
        # drop the instances the crop removed; boxes are tight around what is left
        kept = [i for i, m in enumerate(masks) if m.any()]
        instances = segments_to_instances([classes[i] for i in kept], [masks[i] for i in kept], image_shape)
        instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
        dataset_dict["instances"] = instances
        return dataset_dict
