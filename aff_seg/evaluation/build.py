"""The evaluators of a dataset, chosen by its metadata ``evaluator_type``."""
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    SemSegEvaluator,
)

from .cityscapes import CityscapesInstanceEvaluator

__all__ = ["build_evaluator"]


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator(s) for ``dataset_name``, chosen by its metadata ``evaluator_type``.

    sem_seg -> SemSegEvaluator; coco -> COCOEvaluator (segm, pure-Python COCOeval); lvis ->
    LVISEvaluator (segm); coco_panoptic_seg / cityscapes_panoptic_seg -> the panoptic evaluator
    plus instance and semantic ones for each ``MODEL.MASK_FORMER.TEST.*_ON`` that is set;
    cityscapes_instance / cityscapes_sem_seg -> cityscapesscripts' evaluators (the instance one
    writes its matches into ``output_folder``).
    Instance masks are scored as ``segm`` only: the model's boxes are placeholders.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    test = cfg.MODEL.MASK_FORMER.TEST
    evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type

    def coco_instances():
        return COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder, use_fast_impl=False)

    evaluators = []
    if evaluator_type == "sem_seg":
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif evaluator_type == "coco":
        evaluators.append(coco_instances())
    elif evaluator_type == "lvis":
        evaluators.append(LVISEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))
    elif evaluator_type == "cityscapes_instance":
        evaluators.append(CityscapesInstanceEvaluator(dataset_name, output_folder))
    elif evaluator_type == "cityscapes_sem_seg":
        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    elif evaluator_type == "coco_panoptic_seg":
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if test.INSTANCE_ON:
            evaluators.append(coco_instances())
        if test.SEMANTIC_ON:
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif evaluator_type == "cityscapes_panoptic_seg":
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if test.SEMANTIC_ON:
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        if test.INSTANCE_ON:
            evaluators.append(CityscapesInstanceEvaluator(dataset_name, output_folder))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} of evaluator_type {evaluator_type!r} "
            f"with MODEL.MASK_FORMER.TEST flags {dict(test)}"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
