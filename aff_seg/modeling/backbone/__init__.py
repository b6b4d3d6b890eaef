"""Backbones: AutoFocusFormer (plain core ``AFF``, the detectron2 backbone ``AutoFocusFormer``), the
Focal Transformer (``FocalTransformer``, ``D2FocalTransformer``), and ``AFFCheckpointer`` (code-free
weight loading, official classification checkpoints of both via MODEL.WEIGHTS)."""
from .aff import AFF, AFF_SIZES
from .checkpoint import AFFCheckpointer
from .d2 import AutoFocusFormer
from .focal import D2FocalTransformer, FocalTransformer

__all__ = ["AFF", "AFF_SIZES", "AFFCheckpointer", "AutoFocusFormer", "D2FocalTransformer", "FocalTransformer"]
