"""Models: AFF backbone, point-cloud pixel decoder, Mask2Former decoder, meta-architecture."""
from . import backbone  # noqa: F401  (registers AutoFocusFormer)
from . import pixel_decoder, transformer_decoder, meta_arch  # noqa: F401  (registrations)
from . import backbone_resnet  # noqa: F401  (registers D2ResNetTokens, the R50 baselines' backbone)
