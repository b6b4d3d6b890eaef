"""Evaluation: the evaluator factory and the test-time augmentation detectron2 lacks."""
from .build import build_evaluator
from .test_time_augmentation import SemanticSegmentorWithTTA

__all__ = ["SemanticSegmentorWithTTA", "build_evaluator"]
