"""Backbones: the AutoFocusFormer (plain core ``AFF`` and the detectron2 backbone
``AutoFocusFormer``), the Focal Transformer (plain core ``FocalTransformer`` and the detectron2
backbone ``D2FocalTransformer``), Mask2Former's Swin (``D2SwinTransformer``), ``D2ResNetTokens``
(detectron2's ResNet as grid tokens, the R50 baselines), SegFormer's Mix Transformer
(``MixVisionTransformer`` / ``D2MixVisionTransformer``) and BoostFormer (``BoostFormer`` / ``D2BoostFormer``)."""
from .aff import AFF, AFF_SIZES
from .boostformer import BoostFormer, D2BoostFormer
from .d2 import AutoFocusFormer
from .focal import D2FocalTransformer, FocalTransformer
from .mit import MIT_SIZES, D2MixVisionTransformer, MixVisionTransformer
from .resnet_tokens import D2ResNetTokens
from .swin import D2SwinTransformer

__all__ = ["AFF", "AFF_SIZES", "AutoFocusFormer", "BoostFormer", "D2BoostFormer", "D2FocalTransformer",
           "D2MixVisionTransformer", "D2ResNetTokens", "D2SwinTransformer", "FocalTransformer", "MIT_SIZES",
           "MixVisionTransformer"]
