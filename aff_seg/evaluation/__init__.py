"""Evaluation helpers detectron2 lacks."""
from .test_time_augmentation import SemanticSegmentorWithTTA

__all__ = ["SemanticSegmentorWithTTA"]
