"""MaskFormer meta-architecture (META_ARCH_REGISTRY); MaskFormerHead, MaskFormerHeadFASeg and the
all-MLP heads SegFormerHead, BoostFormerHead (SEM_SEG_HEADS_REGISTRY, the latter two for
detectron2's SemanticSegmentor)."""
from .mask_former_head import MaskFormerHead, MaskFormerHeadFASeg
from .maskformer_model import MaskFormer
from .segformer_head import BoostFormerHead, SegFormerHead
from .validation import InvalidInputError, check_batched_inputs, check_model_config

__all__ = ["BoostFormerHead", "InvalidInputError", "MaskFormer", "MaskFormerHead", "MaskFormerHeadFASeg",
           "SegFormerHead", "check_batched_inputs", "check_model_config"]
