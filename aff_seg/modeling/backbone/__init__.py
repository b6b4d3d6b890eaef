"""AutoFocusFormer backbone: plain core (``AFF``), the detectron2 backbone ``AutoFocusFormer``, and
``AFFCheckpointer`` (code-free weight loading, official classification checkpoints via MODEL.WEIGHTS), and Mask2Former's Swin
(``D2SwinTransformer``, dense maps)."""
from .aff import AFF, AFF_SIZES
from .checkpoint import AFFCheckpointer
from .d2 import AutoFocusFormer
from .swin import D2SwinTransformer

__all__ = ["AFF", "AFF_SIZES", "AFFCheckpointer", "AutoFocusFormer", "D2SwinTransformer"]
