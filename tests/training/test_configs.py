"""Every config under configs/ loads with yaml.safe_load, merges, and builds its model."""
import glob
import os

import pytest
import yaml

import aff_seg  # noqa: F401
from aff_seg import add_maskformer2_config
from aff_seg.data.dataset_mappers import TRAIN_MAPPERS

from .conftest import CONFIGS

CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
# the files a run is started from (not the Base-* files, which only hold shared settings)
RUNNABLE = [f for f in CONFIG_FILES if not os.path.basename(f).startswith("Base-")]


def _ids(files):
    return [os.path.relpath(f, CONFIGS) for f in files]


def merged(path):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def test_the_published_models_are_all_there():
    names = set(_ids(CONFIG_FILES))
    for size in ("mini", "mini_1_5th", "tiny", "tiny_1_5th", "small", "small_1_5th"):
        assert f"ade20k/semantic-segmentation/aff/maskformer2_aff_{size}_bs32_80k.yaml" in names
        assert f"coco/instance-segmentation/aff/maskformer2_aff_{size}_bs64_50ep.yaml" in names
    for task in ("instance", "panoptic", "semantic"):
        for size in ("mini", "tiny", "small"):
            assert f"cityscapes/{task}-segmentation/aff/maskformer2_aff_{size}_bs32_45k.yaml" in names
        assert f"cityscapes/{task}-segmentation/aff/maskformer2_aff_base_384_bs16_90k.yaml" in names
    assert "coco/panoptic-segmentation/aff/maskformer2_aff_mini_bs64_50ep.yaml" in names
    ade = "ade20k/semantic-segmentation/"
    mask2former = [ade + "maskformer2_R101_bs16_90k.yaml"] + [
        ade + f"swin/maskformer2_swin_{size}.yaml"
        for size in ("tiny_bs16_160k", "small_bs16_160k", "base_384_bs16_160k_res640",
                     "base_IN21k_384_bs16_160k_res640", "large_IN21k_384_bs16_160k_res640")
    ] + [f"cityscapes/{task}-segmentation/swin/maskformer2_swin_tiny_bs16_90k.yaml"
         for task in ("semantic", "instance", "panoptic")] + [
        f"coco/{task}-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml" for task in ("instance", "panoptic")]
    assert set(mask2former) <= names
    for r50 in ("ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
                "cityscapes/instance-segmentation/maskformer2_R50_bs16_90k.yaml",
                "coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml"):
        assert r50 in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_config_is_safe_yaml_and_merges(path):
    with open(path) as f:
        assert isinstance(yaml.safe_load(f), dict)
    cfg = merged(path)
    assert cfg.INPUT.DATASET_MAPPER_NAME in TRAIN_MAPPERS
    assert all(isinstance(s, int) for s in cfg.INPUT.MIN_SIZE_TRAIN)
    name = os.path.basename(path)
    if "aff" in name or ("synthetic" in path and not any(s in name for s in ("grid", "segformer", "boostformer", "focal"))):
        assert cfg.MODEL.BACKBONE.NAME == "AutoFocusFormer"
        assert all(d % h == 0 for d, h in zip(cfg.MODEL.AFF.EMBED_DIM, cfg.MODEL.AFF.NUM_HEADS))


def test_values_follow_the_original():
    """Spot checks against the original repository's configs."""
    ade = merged(os.path.join(CONFIGS, "ade20k/semantic-segmentation/aff/maskformer2_aff_mini_1_5th_bs32_80k.yaml"))
    assert (ade.SOLVER.IMS_PER_BATCH, ade.SOLVER.BASE_LR, ade.SOLVER.MAX_ITER) == (32, 2e-4, 80000)
    assert ade.MODEL.AFF.DS_RATE == 0.2 and ade.MODEL.AFF.NUM_HEADS == [2, 4, 8, 16]
    assert ade.INPUT.MIN_SIZE_TRAIN == tuple(int(x * 0.1 * 512) for x in range(5, 21))
    assert ade.INPUT.SIZE_DIVISIBILITY == 512 and ade.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    assert ade.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and ade.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.01
    assert not ade.SOLVER.AMP.ENABLED and ade.SEED == 0

    city = merged(os.path.join(CONFIGS, "cityscapes/panoptic-segmentation/aff/maskformer2_aff_base_384_bs16_90k.yaml"))
    assert city.MODEL.AFF.ALPHA == 8.0 and city.MODEL.AFF.CLUSTER_SIZE == 24
    assert city.MODEL.AFF.NBHD_SIZE == [144] * 4 and city.MODEL.AFF.LAYER_SCALE == 1e-5
    assert city.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 250 and city.TEST.DETECTIONS_PER_IMAGE == 250
    assert city.INPUT.CROP.SIZE == [512, 1024]

    coco = merged(os.path.join(CONFIGS, "coco/instance-segmentation/aff/maskformer2_aff_small_bs64_50ep.yaml"))
    assert coco.MODEL.AFF.SHEPARD_POWER == 4.0 and not coco.MODEL.AFF.SHEPARD_POWER_LEARNABLE
    assert tuple(coco.SOLVER.STEPS) == (81945, 88773) and coco.SOLVER.MAX_ITER == 92188
    assert coco.SOLVER.WARMUP_ITERS == 3 and coco.TEST.EVAL_PERIOD == 2500
    assert coco.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"

    r50 = merged(os.path.join(CONFIGS, "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"))
    assert r50.MODEL.BACKBONE.NAME == "build_resnet_backbone" and r50.MODEL.RESNETS.DEPTH == 50
    swin = merged(os.path.join(CONFIGS, "ade20k/semantic-segmentation/swin/"
                               "maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml"))
    assert swin.MODEL.BACKBONE.NAME == "D2SwinTransformer" and swin.MODEL.SWIN.EMBED_DIM == 192
    assert swin.MODEL.SWIN.NUM_HEADS == [6, 12, 24, 48] and swin.MODEL.SWIN.WINDOW_SIZE == 12
    assert swin.MODEL.SWIN.PRETRAIN_IMG_SIZE == 384 and swin.MODEL.WEIGHTS == "swin_large_patch4_window12_384_22k.pkl"
    assert swin.INPUT.MIN_SIZE_TRAIN == tuple(int(x * 0.1 * 640) for x in range(5, 21))
    assert swin.INPUT.CROP.SIZE == [640, 640] and swin.INPUT.SIZE_DIVISIBILITY == 640
    assert swin.MODEL.MASK_FORMER.DEC_LAYERS == 10 and swin.SOLVER.MAX_ITER == 160000
    tokens = merged(os.path.join(CONFIGS, "ade20k/semantic-segmentation/maskformer2_R50_tokens_bs16_160k.yaml"))
    assert tokens.MODEL.BACKBONE.NAME == "D2ResNetTokens" and tokens.MODEL.RESNETS.DEPTH == 50


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=_ids(RUNNABLE))
def test_config_builds_its_model(path):
    import torch
    from detectron2.modeling import build_model


    cfg = merged(path)
    if cfg.MODEL.META_ARCHITECTURE == "CheckedSemanticSegmentor":  # SegFormer, BoostFormer: built on the meta device
        cfg.merge_from_list(["MODEL.DEVICE", "meta", "MODEL.WEIGHTS", ""])  # (their forward is tested elsewhere)
        with torch.device("meta"):
            model = build_model(cfg)
        assert type(model.backbone).__name__ == cfg.MODEL.BACKBONE.NAME
        assert model.sem_seg_head.classifier.out_channels == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        return
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    assert type(model).__name__ == "MaskFormer"
    expected_backbone = {"build_resnet_backbone": "ResNet"}.get(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.NAME)
    assert type(model.backbone).__name__ == expected_backbone
    predictor = model.sem_seg_head.predictor
    assert predictor.query_feat.weight.shape[0] == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    assert predictor.class_embed.out_features == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accepted_and_ignored_keys_exist_and_nothing_reads_them():
    """The keys documented as accepted-and-ignored are defined, and no module but aff_seg/config.py
    names them (a key that becomes used must leave the list)."""
    from detectron2.config import get_cfg

    from aff_seg.config import ACCEPTED_AND_IGNORED

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    for key in ACCEPTED_AND_IGNORED:
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    repo = os.path.dirname(CONFIGS)
    sources = [p for folder in ("aff_seg", "clusten", "tools", "demo")
               for p in glob.glob(os.path.join(repo, folder, "**", "*.py"), recursive=True)]
    sources.append(os.path.join(repo, "train_net.py"))
    for path in sources:
        if path.endswith(os.path.join("aff_seg", "config.py")):
            continue
        with open(path) as f:
            text = f.read()
        for key in ACCEPTED_AND_IGNORED:
            assert "." + key.split(".")[-1] not in text, f"{path} reads {key}"
