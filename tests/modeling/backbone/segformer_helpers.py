"""Configs of SegFormer / BoostFormer semantic models for the tests (published sizes and tiny ones)."""
import aff_seg  # noqa: F401
from aff_seg import add_maskformer2_config
from aff_seg.modeling.backbone import MIT_SIZES
from detectron2.config import get_cfg

# encoder overrides small enough for a CPU step in well under a second
TINY_MIT = {"EMBED_DIMS": [8, 16, 24, 32], "DEPTHS": [1, 1, 1, 1], "NUM_HEADS": [1, 2, 2, 4]}
TINY_BOOSTFORMER = {"EMBED_DIMS": [8, 16, 24, 32], "DEPTHS": [1, 1, 1, 1], "NUM_HEADS": [1, 2, 2, 4]}


def semantic_cfg(family, size=None, num_classes=150, embed_dim=None, encoder=None, device="cpu"):
    """A (checked) SemanticSegmentor config: ``family`` "mit" (``size`` b0..b5) or "boostformer"; ``encoder`` overrides
    MODEL.MIT / MODEL.BOOSTFORMER keys; ``embed_dim`` the head's D (default: the published one)."""
    cfg = add_maskformer2_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "CheckedSemanticSegmentor"
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    head = cfg.MODEL.SEM_SEG_HEAD
    head.NUM_CLASSES = num_classes
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.NORM = "BN"
    if family == "mit":
        cfg.MODEL.BACKBONE.NAME = "D2MixVisionTransformer"
        keys = cfg.MODEL.MIT
        if size is not None:
            keys.EMBED_DIMS = list(MIT_SIZES[size]["embed_dims"])
            keys.DEPTHS = list(MIT_SIZES[size]["depths"])
        head.NAME = "SegFormerHead"
        head.CONVS_DIM = embed_dim or (256 if size in ("b0", "b1") else 768)
    else:
        cfg.MODEL.BACKBONE.NAME = "D2BoostFormer"
        keys = cfg.MODEL.BOOSTFORMER
        keys.NORM = "BN"
        head.NAME = "BoostFormerHead"
        head.CONVS_DIM = embed_dim or 768
    for key, value in (encoder or {}).items():
        setattr(keys, key, value)
    return cfg
