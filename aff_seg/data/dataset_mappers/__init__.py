"""The Mask2Former training mappers, chosen by ``INPUT.DATASET_MAPPER_NAME``."""
from .coco_instance_new_baseline_dataset_mapper import COCOInstanceNewBaselineDatasetMapper
from .coco_panoptic_new_baseline_dataset_mapper import COCOPanopticNewBaselineDatasetMapper
from .mask_former_instance_dataset_mapper import MaskFormerInstanceDatasetMapper
from .mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper
from .mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper

__all__ = [
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "TRAIN_MAPPERS",
    "build_train_mapper",
    "label_classes",
]

# INPUT.DATASET_MAPPER_NAME -> mapper class
TRAIN_MAPPERS = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
}


def label_classes(mapper_name):
    """The metadata list (``thing_classes`` or ``stuff_classes``) that the targets of the mapper
    ``mapper_name`` index: instance mappers label the things only, the others every class."""
    mapper = TRAIN_MAPPERS.get(mapper_name)
    return mapper.label_classes if mapper is not None else "stuff_classes"


def build_train_mapper(cfg):
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in TRAIN_MAPPERS:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not one of {sorted(TRAIN_MAPPERS)}"
        )
    return TRAIN_MAPPERS[name](cfg, True)
