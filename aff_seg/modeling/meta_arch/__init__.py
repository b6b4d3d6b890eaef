"""MaskFormer meta-architecture (META_ARCH_REGISTRY); MaskFormerHead, MaskFormerHeadFASeg and the
all-MLP heads SegFormerHead, SegFormerConvHead, BoostFormerHead (SEM_SEG_HEADS_REGISTRY, the latter three for
CheckedSemanticSegmentor, detectron2's SemanticSegmentor with the input checks)."""
from .mask_former_head import MaskFormerHead, MaskFormerHeadFASeg
from .maskformer_model import MaskFormer
from .segformer_head import BoostFormerHead, SegFormerConvHead, SegFormerHead
from .semantic_segmentor import CheckedSemanticSegmentor
from .validation import InvalidInputError, check_batched_inputs, check_model_config

__all__ = ["BoostFormerHead", "CheckedSemanticSegmentor", "InvalidInputError", "MaskFormer", "MaskFormerHead", "MaskFormerHeadFASeg",
           "SegFormerConvHead", "SegFormerHead", "check_batched_inputs", "check_model_config"]
