"""Pixel decoders (SEM_SEG_HEADS_REGISTRY): upstream Mask2Former's on dense maps (``msdeformattn``)
and AFF's on token point clouds (``msdeformattn_pc``), :mod:`aff_seg.modeling.variants` picks
one; FASeg's on dense maps (``faseg``)."""
from .msdeformattn import MSDeformAttnPixelDecoder
from .faseg import MSDeformAttnPixelDecoder4ScalesFASeg
from .msdeformattn_pc import MSDeformAttnPixelDecoderPc, build_pixel_decoder

__all__ = ["MSDeformAttnPixelDecoder", "MSDeformAttnPixelDecoder4ScalesFASeg", "MSDeformAttnPixelDecoderPc",
           "build_pixel_decoder"]
