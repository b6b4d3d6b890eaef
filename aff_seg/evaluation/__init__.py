"""Evaluation: the evaluator factory, and the test-time augmentation and sliding-window inference detectron2
lacks."""
from .build import build_evaluator
from .sliding_window import SlidingWindowInference
from .test_time_augmentation import SemanticSegmentorWithTTA

__all__ = ["SemanticSegmentorWithTTA", "SlidingWindowInference", "build_evaluator"]
