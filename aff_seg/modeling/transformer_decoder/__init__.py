"""Mask2Former transformer decoders on tokens, plain and FASeg (TRANSFORMER_MODULE registry)."""
from .mask2former_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)
from .faseg import MultiScaleMaskedTransformerDecoderFASeg
from .position_encoding import PointPositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MultiScaleMaskedTransformerDecoder",
    "MultiScaleMaskedTransformerDecoderFASeg",
    "build_transformer_decoder",
    "PointPositionEmbeddingSine",
]
