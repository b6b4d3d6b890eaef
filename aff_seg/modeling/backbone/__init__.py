"""AutoFocusFormer backbone: plain core (``AFF``), the detectron2 backbone ``AutoFocusFormer``, and
``AFFCheckpointer`` (code-free weight loading, official classification checkpoints via MODEL.WEIGHTS)."""
from .aff import AFF, AFF_SIZES
from .checkpoint import AFFCheckpointer
from .d2 import AutoFocusFormer

__all__ = ["AFF", "AFF_SIZES", "AFFCheckpointer", "AutoFocusFormer"]
