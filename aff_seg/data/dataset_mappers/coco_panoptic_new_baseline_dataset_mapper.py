"""Large-scale-jitter training mapper for COCO panoptic segmentation
(``INPUT.DATASET_MAPPER_NAME: coco_panoptic_lsj``)."""
from detectron2.structures import BitMasks
from panopticapi.utils import rgb2id

from .utils import LargeScaleJitterMapper, panoptic_segments, read_label_map, segments_to_instances

__all__ = ["COCOPanopticNewBaselineDatasetMapper"]


class COCOPanopticNewBaselineDatasetMapper(LargeScaleJitterMapper):
    """Flip, rescale (LSJ) and crop/pad to a fixed square; one mask target per non-crowd
    segment of the panoptic PNG.

    Output dict: ``image`` (3 x S x S uint8) and ``instances`` (gt_classes, gt_masks S x S,
    gt_boxes around each mask).
    """

    def __call__(self, dataset_dict):
        dataset_dict, transforms, _ = self.read_and_augment(dataset_dict)
        image_shape = dataset_dict["image"].shape[1:]
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(f"{dataset_dict['file_name']}: no 'pan_seg_file_name' to train on")

        pan_seg = read_label_map(dataset_dict.pop("pan_seg_file_name"), dataset_dict, "RGB")
        pan_seg = rgb2id(transforms.apply_segmentation(pan_seg))
        classes, masks = panoptic_segments(pan_seg, dataset_dict["segments_info"])
        instances = segments_to_instances(classes, masks, image_shape)
        instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
        dataset_dict["instances"] = instances
        return dataset_dict
