"""Backbones: the AutoFocusFormer (plain core ``AFF`` and the detectron2 backbone
``AutoFocusFormer``), the Focal Transformer (plain core ``FocalTransformer`` and the detectron2
backbone ``D2FocalTransformer``) and ``D2ResNetTokens`` (detectron2's ResNet as grid tokens, the
R50 baselines)."""
from .aff import AFF, AFF_SIZES
from .d2 import AutoFocusFormer
from .focal import D2FocalTransformer, FocalTransformer
from .resnet_tokens import D2ResNetTokens

__all__ = ["AFF", "AFF_SIZES", "AutoFocusFormer", "D2FocalTransformer", "D2ResNetTokens", "FocalTransformer"]
