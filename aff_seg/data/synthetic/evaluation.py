"""Ground truth scored as predictions through detectron2's evaluators: checks every format end to end."""
import contextlib
import io

import numpy as np
from PIL import Image

from .scene import DATASETS

__all__ = ["evaluate_ground_truth"]


def _semantic_logits(record, num_classes, ignore_label):
    """One-hot ``num_classes x h x w`` scores of a record's semantic ground truth."""
    import torch

    label = torch.from_numpy(np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64))
    label[label == ignore_label] = 0  # ignored pixels are not scored: any class will do
    return torch.nn.functional.one_hot(label, num_classes).permute(2, 0, 1).float()


def _instances(record):
    import pycocotools.mask as mask_util
    import torch
    from detectron2.structures import Boxes, BoxMode, Instances

    h, w = record["height"], record["width"]
    annotations = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
    masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)))
             for a in annotations]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
    instances = Instances((h, w))
    instances.pred_masks = torch.as_tensor(np.array(masks, dtype=bool).reshape(-1, h, w))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.ones(len(annotations))
    instances.pred_classes = torch.tensor([a["category_id"] for a in annotations],
                                          dtype=torch.int64)
    return instances


def _panoptic(record, metadata):
    import torch
    from panopticapi.utils import rgb2id

    ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]), dtype=np.uint32))
    thing_ids = set(metadata.thing_dataset_id_to_contiguous_id.values())
    segments_info = [{"id": s["id"], "category_id": s["category_id"],
                      "isthing": s.get("isthing", s["category_id"] in thing_ids)}
                     for s in record["segments_info"]]
    return torch.from_numpy(ids.astype(np.int32)), segments_info


def _ground_truth_as_predictions(name, task):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    metadata = MetadataCatalog.get(name)
    for record in DatasetCatalog.get(name):
        if task == "sem_seg":
            output = {"sem_seg": _semantic_logits(record, len(metadata.stuff_classes),
                                                  metadata.ignore_label)}
        elif task == "instances":
            output = {"instances": _instances(record)}
        else:
            output = {"panoptic_seg": _panoptic(record, metadata)}
        yield record, output


#: (dataset, registered name, task, metric) that ``evaluate_ground_truth`` reports
_GROUND_TRUTH_CHECKS = (
    ("ade20k", "ade20k_sem_seg_val", "sem_seg", "mIoU"),
    ("coco", "coco_2017_val", "instances", "AP"),
    ("coco", "coco_2017_val_panoptic_with_sem_seg", "panoptic_seg", "PQ"),
    ("coco", "coco_2017_val_panoptic_with_sem_seg", "sem_seg", "mIoU"),
    ("cityscapes", "cityscapes_fine_sem_seg_val", "sem_seg", "mIoU"),
    ("cityscapes", "cityscapes_fine_panoptic_val", "panoptic_seg", "PQ"),
    ("lvis", "lvis_v1_val", "instances", "AP"),
)


def evaluate_ground_truth(root, datasets=tuple(DATASETS), verbose=True):
    """Score each dataset's val ground truth, given as the prediction, with detectron2's
    evaluators (``SemSegEvaluator``, ``COCOEvaluator(use_fast_impl=False)``,
    ``COCOPanopticEvaluator``, ``LVISEvaluator``).  Every number is 100 when the files are consistent.

    Points the standard dataset names at ``root`` first (``register_standard_datasets``).

    Returns:
        dict: ``{"<dataset name> <metric>": value}``, e.g. ``"coco_2017_val segm AP"``.
    """
    from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, LVISEvaluator, SemSegEvaluator

    from ..datasets import register_standard_datasets

    register_standard_datasets(root)
    results = {}
    for dataset, name, task, metric in _GROUND_TRUTH_CHECKS:
        if dataset not in datasets:
            continue
        if task == "sem_seg":
            evaluator = SemSegEvaluator(name, distributed=False)
        elif dataset == "lvis":
            evaluator = LVISEvaluator(name, tasks=("bbox", "segm"), distributed=False)
        elif task == "instances":
            evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False,
                                      use_fast_impl=False)
        else:
            evaluator = COCOPanopticEvaluator(name)
        evaluator.reset()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' and panopticapi's tables
            for record, output in _ground_truth_as_predictions(name, task):
                evaluator.process([record], [output])
            scores = evaluator.evaluate()
        for group, values in scores.items():
            key = f"{name} {group} {metric}" if task == "instances" else f"{name} {metric}"
            results[key] = float(values[metric])
    if verbose:
        print(f"ground truth scored as predictions, datasets under {root}:")
        for key, value in results.items():
            print(f"  {key:<55s} {value:7.2f}")
    return results
