"""Mask2Former transformer decoders (TRANSFORMER_MODULE registry): the grid variant on dense maps
(``mask2former_transformer_decoder_grid``) and the point-cloud variant on tokens
(``mask2former_transformer_decoder``); :mod:`aff_seg.modeling.variants` picks one.  FASeg's
(``faseg``, ``faseg_pc``) likewise."""
from .mask2former_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MaskedTransformerDecoderBase,
    MultiScaleMaskedTransformerDecoderPc,
    build_transformer_decoder,
)
from .mask2former_transformer_decoder_grid import MultiScaleMaskedTransformerDecoder
from .faseg import MultiScaleMaskedTransformerDecoderFASeg
from .faseg_pc import MultiScaleMaskedTransformerDecoderFASegPc
from .position_encoding import PointPositionEmbeddingSine, PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MaskedTransformerDecoderBase",
    "MultiScaleMaskedTransformerDecoder",
    "MultiScaleMaskedTransformerDecoderPc",
    "MultiScaleMaskedTransformerDecoderFASeg",
    "MultiScaleMaskedTransformerDecoderFASegPc",
    "build_transformer_decoder",
    "PointPositionEmbeddingSine",
    "PositionEmbeddingSine",
]
