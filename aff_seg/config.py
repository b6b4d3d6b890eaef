"""Every config key aff_seg adds to detectron2's defaults, each default written once.

``add_maskformer2_config(cfg)`` takes a detectron2 ``get_cfg()`` and adds:

* DeepLab's keys (poly LR schedule, crop-category constraint) through detectron2's own
  ``add_deeplab_config``;
* Mask2Former's keys, with the AFF repository's defaults (its pixel decoder is the default);
* ``MODEL.AFF.*``, the backbone keys of the original AFF configs;
* what this project adds (``SOLVER.AMP.PRECISION``, ``MODEL.AFF.FUSED_ATTENTION`` ...).

So the original AFF and Mask2Former config files merge unchanged.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_maskformer2_config"]


def add_maskformer2_config(cfg):
    """Add the Mask2Former + AFF keys to ``cfg`` in place and return it."""
    add_deeplab_config(cfg)

    # data
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # large-scale jitter (coco_*_lsj mappers)
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # checkpoints: False lets MODEL.WEIGHTS / --resume load with missing, unexpected or
    # mismatched keys (they are listed); True stops the run on them
    cfg.MODEL.WEIGHTS_STRICT = True

    # solver
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # AMP dtype when SOLVER.AMP.ENABLED: "bfloat16" or "float16" (float16 uses a GradScaler)
    cfg.SOLVER.AMP.PRECISION = "bfloat16"

    # Mask2Former
    cfg.MODEL.MASK_FORMER = CN()
    mf = cfg.MODEL.MASK_FORMER
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 1.0
    mf.DICE_WEIGHT = 1.0
    mf.MASK_WEIGHT = 20.0
    mf.NHEADS = 8
    mf.DROPOUT = 0.1
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    mf.DEC_LAYERS = 6
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.TRANSFORMER_IN_FEATURE = "res5"
    mf.ENFORCE_INPUT_PROJ = False
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # the input is padded to a multiple of this (the backbone has no size_divisibility)
    mf.SIZE_DIVISIBILITY = 32
    # point-sampled mask loss
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = False
    mf.TEST.PANOPTIC_ON = False
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.0
    mf.TEST.OVERLAP_THRESHOLD = 0.0
    mf.TEST.SANITY_CHECK = False
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    head = cfg.MODEL.SEM_SEG_HEAD
    head.MASK_DIM = 256
    head.TRANSFORMER_ENC_LAYERS = 0
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # kept for config compatibility; the point-cloud decoder uses 4 points and
    # MASK_FORMER.NHEADS heads (reference section 8.1)
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8

    # AutoFocusFormer backbone (the original's defaults, including their flaw: 3 heads do
    # not divide 32 channels; every shipped config sets both)
    cfg.MODEL.AFF = CN()
    aff = cfg.MODEL.AFF
    aff.EMBED_DIM = [32, 128, 256, 384]
    aff.DEPTHS = [2, 2, 6, 2]
    aff.NUM_HEADS = [3, 6, 12, 24]
    aff.MLP_RATIO = 2.0
    aff.CLUSTER_SIZE = 8
    aff.NBHD_SIZE = [48, 48, 48, 48]
    aff.LAYER_SCALE = 0.0
    aff.ALPHA = 4.0
    aff.DS_RATE = 0.25
    aff.RESERVE = True
    aff.DROP_RATE = 0.0
    aff.ATTN_DROP_RATE = 0.0
    aff.DROP_PATH_RATE = 0.3
    aff.PATCH_NORM = True
    aff.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # pixel decoder's Shepard interpolation: weights ~ d^-SHEPARD_POWER
    aff.SHEPARD_POWER = 6.0
    aff.SHEPARD_POWER_LEARNABLE = True
    # this project: cluster attention through the fused op (False: the unfused reference chain)
    aff.FUSED_ATTENTION = True

    # SegFormer's Mix Transformer encoder (D2MixVisionTransformer); defaults: MiT-B2 as NVlabs builds it
    cfg.MODEL.MIT = CN()
    mit = cfg.MODEL.MIT
    mit.EMBED_DIMS = [64, 128, 320, 512]
    mit.DEPTHS = [3, 4, 6, 3]
    mit.NUM_HEADS = [1, 2, 5, 8]
    mit.SR_RATIOS = [8, 4, 2, 1]
    mit.MLP_RATIOS = [4, 4, 4, 4]
    mit.PATCH_SIZES = [7, 3, 3, 3]
    mit.STRIDES = [4, 2, 2, 2]
    mit.QKV_BIAS = True
    mit.DROP_PATH_RATE = 0.1
    # eps of the block and stage LayerNorms: 1e-6 as NVlabs, 1e-5 as HuggingFace
    mit.LN_EPS = 1e-6
    mit.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # BoostFormer encoder (D2BoostFormer); defaults: the only published size
    cfg.MODEL.BOOSTFORMER = CN()
    bf = cfg.MODEL.BOOSTFORMER
    bf.EMBED_DIMS = [64, 128, 320, 512]
    bf.DEPTHS = [3, 4, 6, 3]
    bf.NUM_HEADS = [1, 2, 5, 8]
    bf.BLOCK_TYPES = ["pool", "pool", "attn", "attn"]
    bf.MLP_RATIOS = [4, 4, 4, 4]
    bf.PATCH_SIZES = [7, 3, 3, 3]
    bf.STRIDES = [4, 2, 2, 2]
    bf.TOKEN_POOL_SIZE = 3  # average pool of the pool blocks' token mixer
    bf.KV_POOL_SIZE = 7  # keys/values of the attention blocks: an adaptive KV_POOL_SIZE^2 pool of the map
    bf.MIX_KERNELS = [3, 5]  # depthwise kernels on the two halves of the MixCFN channels
    bf.LAYER_SCALE_INIT = 1e-5
    bf.NORM = "SyncBN"  # the BatchNorms in the pool blocks and MixCFNs: "BN" or "SyncBN"
    bf.DROP_PATH_RATE = 0.1
    bf.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # all-MLP semantic heads (SegFormerHead, BoostFormerHead): dropout before the classifier
    head.DROPOUT = 0.1

    # sliding-window inference of semantic models: SIZE (h, w) windows every STRIDE (h, w) pixels
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.SIZE = [1024, 1024]
    cfg.TEST.SLIDING_WINDOW.STRIDE = [768, 768]
    return cfg
