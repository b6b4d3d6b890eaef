"""Backbones: the AutoFocusFormer (plain core ``AFF`` and the detectron2 backbone
``AutoFocusFormer``), the Focal Transformer (plain core ``FocalTransformer`` and the detectron2
backbone ``D2FocalTransformer``), Mask2Former's Swin (``D2SwinTransformer``) and ``D2ResNetTokens``
(detectron2's ResNet as grid tokens, the R50 baselines)."""
from .aff import AFF, AFF_SIZES
from .d2 import AutoFocusFormer
from .focal import D2FocalTransformer, FocalTransformer
from .resnet_tokens import D2ResNetTokens
from .swin import D2SwinTransformer

__all__ = ["AFF", "AFF_SIZES", "AutoFocusFormer", "D2FocalTransformer", "D2ResNetTokens", "D2SwinTransformer",
           "FocalTransformer"]
