"""MaskFormer meta-architecture (META_ARCH_REGISTRY) and MaskFormerHead (SEM_SEG_HEADS_REGISTRY)."""
from .mask_former_head import MaskFormerHead
from .maskformer_model import MaskFormer
from .validation import InvalidInputError, check_batched_inputs, check_model_config

__all__ = ["InvalidInputError", "MaskFormer", "MaskFormerHead", "check_batched_inputs", "check_model_config"]
