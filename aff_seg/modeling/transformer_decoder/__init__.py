"""Mask2Former transformer decoder on tokens (TRANSFORMER_MODULE registry)."""
from .mask2former_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)
from .position_encoding import PointPositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MultiScaleMaskedTransformerDecoder",
    "build_transformer_decoder",
    "PointPositionEmbeddingSine",
]
