"""Datasets, dataset mappers, the training data stream and synthetic data."""
from . import dataset_mappers  # noqa: F401  (training mappers chosen by INPUT.DATASET_MAPPER_NAME)
from . import datasets  # noqa: F401  (ADE20K colours, cocofied LVIS, COCO panoptic + sem seg, path checks)
from .build import build_train_loader

__all__ = ["build_train_loader"]
