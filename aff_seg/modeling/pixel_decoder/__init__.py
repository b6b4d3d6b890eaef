"""Point-cloud pixel decoder (registers MSDeformAttnPixelDecoder in SEM_SEG_HEADS_REGISTRY)."""
from .msdeformattn_pc import MSDeformAttnPixelDecoder, build_pixel_decoder

__all__ = ["MSDeformAttnPixelDecoder", "build_pixel_decoder"]
