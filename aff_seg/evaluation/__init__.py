"""Evaluation helpers detectron2 lacks."""
