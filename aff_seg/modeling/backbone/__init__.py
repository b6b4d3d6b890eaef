"""AutoFocusFormer backbone: plain core (``AFF``) and the detectron2 backbone ``AutoFocusFormer``."""
from .aff import AFF, AFF_SIZES
from .d2 import AutoFocusFormer

__all__ = ["AFF", "AFF_SIZES", "AutoFocusFormer"]
