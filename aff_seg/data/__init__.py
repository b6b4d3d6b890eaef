"""Datasets, dataset mappers and synthetic data."""
from . import dataset_mappers  # noqa: F401  (training mappers chosen by INPUT.DATASET_MAPPER_NAME)
from . import datasets  # noqa: F401  (ADE20K colours, cocofied LVIS, COCO panoptic + sem seg, path checks)
