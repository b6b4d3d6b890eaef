"""Backbones: the AutoFocusFormer (plain core ``AFF`` and the detectron2 backbone
``AutoFocusFormer``) and ``D2ResNetTokens`` (detectron2's ResNet as grid tokens, the R50 baselines)."""
from .aff import AFF, AFF_SIZES
from .d2 import AutoFocusFormer
from .resnet_tokens import D2ResNetTokens

__all__ = ["AFF", "AFF_SIZES", "AutoFocusFormer", "D2ResNetTokens"]
