"""Backbones: the AutoFocusFormer core (``AFF``) and its detectron2 backbone ``AutoFocusFormer``, SegFormer's
``D2MixVisionTransformer`` and ``D2BoostFormer``; ``AFFCheckpointer`` (code-free weight loading, official
classification checkpoints and SegFormer/BoostFormer formats via MODEL.WEIGHTS)."""
from .aff import AFF, AFF_SIZES
from .boostformer import BoostFormer, D2BoostFormer
from .checkpoint import AFFCheckpointer
from .d2 import AutoFocusFormer
from .mit import MIT_SIZES, D2MixVisionTransformer, MixVisionTransformer

__all__ = [
    "AFF",
    "AFF_SIZES",
    "AFFCheckpointer",
    "AutoFocusFormer",
    "BoostFormer",
    "D2BoostFormer",
    "D2MixVisionTransformer",
    "MIT_SIZES",
    "MixVisionTransformer",
]
