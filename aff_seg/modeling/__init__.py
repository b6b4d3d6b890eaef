"""Models: backbones (AFF, ResNet tokens), point-cloud pixel decoder, Mask2Former decoder, meta-architecture."""
from . import backbone  # noqa: F401  (registers AutoFocusFormer and D2ResNetTokens)
from . import pixel_decoder, transformer_decoder, meta_arch  # noqa: F401  (registrations)
