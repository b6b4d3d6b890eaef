"""Every config key aff_seg adds to detectron2's defaults, each default written once.

``add_maskformer2_config(cfg)`` takes a detectron2 ``get_cfg()`` and adds:

* DeepLab's keys (poly LR schedule, crop-category constraint) through detectron2's own
  ``add_deeplab_config``;
* Mask2Former's keys, with the AFF repository's defaults (its pixel decoder is the default);
* ``MODEL.AFF.*``, the backbone keys of the original AFF configs;
* ``MODEL.SWIN.*``, Mask2Former's Swin backbone keys;
* what this project adds (``SOLVER.AMP.PRECISION``, ``MODEL.AFF.FUSED_ATTENTION`` ...).

So the original AFF and Mask2Former config files merge unchanged.

``load_config(config_file, opts)`` is how every entry point (``train_net.py``, the demo, the
tools) reads a config: YAML is parsed with ``yaml.safe_load`` only, in the file and in every
``_BASE_`` it inherits, so a config file cannot run code (detectron2's ``merge_from_file``
falls back to ``yaml.unsafe_load``). The original configs' ``!!python/object/apply:eval`` lists
are refused with the file and line; ``tools/convert-config-safe.py`` rewrites them as plain lists.
"""
import difflib

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["ACCEPTED_AND_IGNORED", "ConfigError", "SafeCfgNode", "add_maskformer2_config", "load_config"]

#: keys that the original configs (and detectron2's ``add_deeplab_config``) set but nothing in
#: aff_seg reads: defined so those files merge unchanged, and ignored
ACCEPTED_AND_IGNORED = (
    "MODEL.MASK_FORMER.ENC_LAYERS",  # Mask2Former's; its decoder has no encoder of its own
    "MODEL.MASK_FORMER.TEST.SANITY_CHECK",  # Mask2Former's
    # the deformable encoders use 4 sampling points and MASK_FORMER.NHEADS heads, as the originals
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS",
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS",
    # DeepLab's head and ResNet options, from add_deeplab_config
    "MODEL.SEM_SEG_HEAD.LOSS_TYPE",
    "MODEL.SEM_SEG_HEAD.PROJECT_FEATURES",
    "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS",
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS",
    "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS",
    "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT",
    "MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV",
    "MODEL.RESNETS.RES4_DILATION",
    "MODEL.RESNETS.RES5_MULTI_GRID",
    "MODEL.RESNETS.STEM_TYPE",
)

CONVERTER = "tools/convert-config-safe.py"


class ConfigError(ValueError):
    """A config file that cannot be used (unsafe tag, empty, not a mapping); names the file."""


class SafeCfgNode(CN):
    """detectron2's ``CfgNode`` whose files (and their ``_BASE_`` chain) are read with
    ``yaml.safe_load`` only: ``allow_unsafe`` is ignored, tags that would construct Python
    objects raise ``ConfigError`` before anything runs."""

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        with cls._open_cfg(filename) as f:
            try:
                content = yaml.safe_load(f)
            except yaml.constructor.ConstructorError as e:
                mark = e.problem_mark
                where = f"{filename}, line {mark.line + 1}" if mark is not None else filename
                raise ConfigError(
                    f"{where}: {e.problem}. Config files are read with yaml.safe_load, so they cannot run "
                    f"code; write the value literally (e.g. a plain list). `python {CONVERTER} {filename}` "
                    "rewrites the original configs' `!!python/object/apply:eval` lists."
                ) from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{filename}: not valid YAML: {e}") from None
        if content is None:
            raise ConfigError(f"config file {filename} is empty")
        if not isinstance(content, dict):
            raise ConfigError(f"config file {filename} must hold a mapping of keys, got {type(content).__name__}")
        # content is safe: detectron2/fvcore merge it with its _BASE_ chain (each base read here too)
        return super().load_yaml_with_base(filename, allow_unsafe=False)


def load_config(config_file=None, opts=()):
    """The project's defaults, then ``config_file`` (safe YAML) and ``KEY VALUE`` ``opts``.

    Returns:
        a ``SafeCfgNode``, not frozen.
    Raises:
        ConfigError: the file, or a ``_BASE_`` it inherits, is empty, not a mapping, or holds
            a tag that would run code; a key (in the file or in ``opts``) does not exist (the
            message names it, where it came from, and the closest existing keys).
    """
    cfg = SafeCfgNode(add_maskformer2_config(get_cfg()))
    for source, merge, value in ((config_file, cfg.merge_from_file, config_file),
                                 ("the command-line overrides", cfg.merge_from_list, list(opts))):
        if not value:
            continue
        try:
            merge(value)
        except (KeyError, AssertionError) as e:  # yacs: KeyError from files, AssertionError from lists
            raise _unknown_key_error(cfg, e, source) from None
    return cfg


def _unknown_key_error(cfg, error, source):
    """``ConfigError`` for yacs' unknown-key errors ("Non-existent config key: A.B" from a file,
    "Non-existent key: A.B" from a list), with the keys that look alike; other errors are
    returned unchanged."""
    message = str(error.args[0]) if error.args else ""
    prefixes = [p for p in ("Non-existent config key: ", "Non-existent key: ") if message.startswith(p)]
    if not prefixes:
        return error
    key = message[len(prefixes[0]):]

    def flat(node, path=""):
        for name, value in node.items():
            full = f"{path}{name}"
            yield full
            if isinstance(value, CN):
                yield from flat(value, full + ".")

    close = difflib.get_close_matches(key, list(flat(cfg)), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "check its spelling against aff_seg/config.py"
    return ConfigError(f"config key {key} (from {source}) does not exist: {hint}")


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
    # inference (evaluation, aff_seg.Predictor, the demo) under autocast: "bfloat16" or "float16"
    cfg.TEST.AMP = CN()
    cfg.TEST.AMP.ENABLED = False
    cfg.TEST.AMP.PRECISION = "bfloat16"
    # aff_seg.Predictor (the demo) and tools/benchmark.py run the backbone and the segmentation
    # head compiled by torch.compile (inductor; needs a C++ compiler); every new input size
    # compiles again on its first call (minutes on a CPU)
    cfg.TEST.COMPILE = False

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
    # inference returns "sem_seg_labels" (H x W argmax) computed a few rows at a time instead
    # of K x H x W scores: bounded memory for large images; the evaluators need the scores
    mf.TEST.SEMANTIC_LABELS_ONLY = False

    # FASeg's decoder (dynamic focus-aware positional queries + high-resolution cross-attention),
    # the constants the original hard-wires, with its values (docs/faseg.md)
    mf.FASEG = CN()
    # high-resolution layers attend to the res2 cells of the top (res5 cells // OMEGA_RATE) res5 cells
    mf.FASEG.OMEGA_RATE = 32
    # a query attends to the tokens where its predicted mask probability reaches this
    mf.FASEG.ATTN_MASK_THRESHOLD = 0.15
    # the first positional queries pool the res5 encodings over the predicted masks, thresholded here;
    # COMPLEMENT pools where the probability is *below* it, as the original (and its weights) do
    mf.FASEG.INIT_POOL_THRESHOLD = 0.5
    mf.FASEG.INIT_POOL_COMPLEMENT = True
    # every HR_EVERY-th decoder layer is a high-resolution layer (0: none, positional queries only)
    mf.FASEG.HR_EVERY = 4

    head = cfg.MODEL.SEM_SEG_HEAD
    head.MASK_DIM = 256
    head.TRANSFORMER_ENC_LAYERS = 0
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8

    # Swin Transformer backbone (D2SwinTransformer; Mask2Former's keys and defaults)
    cfg.MODEL.SWIN = CN()
    swin = cfg.MODEL.SWIN
    swin.PRETRAIN_IMG_SIZE = 224
    swin.PATCH_SIZE = 4
    swin.EMBED_DIM = 96
    swin.DEPTHS = [2, 2, 6, 2]
    swin.NUM_HEADS = [3, 6, 12, 24]
    swin.WINDOW_SIZE = 7
    swin.MLP_RATIO = 4.0
    swin.QKV_BIAS = True
    swin.QK_SCALE = None
    swin.DROP_RATE = 0.0
    swin.ATTN_DROP_RATE = 0.0
    swin.DROP_PATH_RATE = 0.3
    swin.APE = False
    swin.PATCH_NORM = True
    swin.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    swin.USE_CHECKPOINT = False

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
    # this project: the stem's BatchNorm, a detectron2 norm name: "BN" (the original's; statistics
    # of each process's batch), "naiveSyncBN" (any device) or "SyncBN" (GPUs): of the global batch
    aff.STEM_NORM = "BN"
    aff.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # pixel decoder's Shepard interpolation: weights ~ d^-SHEPARD_POWER
    aff.SHEPARD_POWER = 6.0
    aff.SHEPARD_POWER_LEARNABLE = True
    # this project: cluster attention through the fused op (False: the unfused reference chain)
    aff.FUSED_ATTENTION = True

    # Focal Transformer backbone (D2FocalTransformer): the original's key names, defaults = the
    # published Focal-T (the original's own defaults, FOCAL_POOL "none" and FOCAL_LEVELS 1,
    # describe no published model)
    cfg.MODEL.FOCAL = CN()
    focal = cfg.MODEL.FOCAL
    focal.EMBED_DIM = 96
    focal.DEPTHS = [2, 2, 6, 2]
    focal.NUM_HEADS = [3, 6, 12, 24]
    focal.WINDOW_SIZE = 7
    focal.MLP_RATIO = 4.0
    focal.QKV_BIAS = True
    focal.QK_SCALE = None  # None (or False, as in the original's configs): head_dim ** -0.5
    focal.DROP_RATE = 0.0
    focal.ATTN_DROP_RATE = 0.0
    focal.DROP_PATH_RATE = 0.2
    focal.APE = False  # True is refused
    focal.PATCH_NORM = True
    focal.USE_SHIFT = False  # True is refused
    focal.FOCAL_POOL = "fc"  # "fc", "mean", "max", "conv" or "none"
    focal.FOCAL_STAGES = [0, 1, 2, 3]
    focal.FOCAL_LEVELS = [2, 2, 2, 2]  # 0, 1 or 2 per stage
    focal.FOCAL_WINDOWS = [7, 5, 3, 1]
    focal.EXPAND_STAGES = [0, 1, 2, 3]  # ignored by the original; only all stages are accepted
    focal.EXPAND_SIZES = [3, 3, 3, 3]
    focal.EXPAND_LAYER = "all"  # "all", "even" or "odd" (blocks without the ring)
    focal.USE_CONV_EMBED = False
    focal.USE_LAYERSCALE = False
    focal.LAYERSCALE_VALUE = 1e-4
    focal.USE_PRE_NORM = False
    focal.USE_CHECKPOINT = False
    # this project: the pretraining resolution decides which stages have the ring
    focal.PRETRAIN_IMG_SIZE = 224
    focal.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # SegFormer's Mix Transformer encoder (D2MixVisionTransformer); defaults: MiT-B2 as NVlabs builds it.
    # Here and in MODEL.BOOSTFORMER each key is the encoder's constructor argument of that name in lower case.
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

    # all-MLP semantic heads (SegFormerHead, SegFormerConvHead, BoostFormerHead): dropout before the classifier
    head.DROPOUT = 0.1

    # sliding-window inference of semantic models: SIZE (h, w) windows every STRIDE (h, w) pixels
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.SIZE = [1024, 1024]
    cfg.TEST.SLIDING_WINDOW.STRIDE = [768, 768]
    return cfg
