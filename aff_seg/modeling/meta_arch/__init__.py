"""MaskFormer meta-architecture (META_ARCH_REGISTRY) and MaskFormerHead (SEM_SEG_HEADS_REGISTRY)."""
from .mask_former_head import MaskFormerHead
from .maskformer_model import MaskFormer

__all__ = ["MaskFormer", "MaskFormerHead"]
