"""SegFormer/BoostFormer configs: the published recipe's values, and the synthetic quick configs train and
evaluate (Cityscapes with the sliding-window test)."""
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.modeling import build_model

from aff_seg import add_maskformer2_config
from aff_seg.evaluation import SlidingWindowInference
from aff_seg.solver import build_optimizer

from .conftest import CONFIGS
from .test_train_loop import train

TINY = ["MODEL.MIT.EMBED_DIMS", "[8, 16, 24, 32]", "MODEL.MIT.DEPTHS", "[1, 1, 1, 1]", "MODEL.MIT.NUM_HEADS", "[1, 2, 2, 4]",
        "MODEL.BOOSTFORMER.EMBED_DIMS", "[8, 16, 24, 32]", "MODEL.BOOSTFORMER.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.BOOSTFORMER.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0"]


def merged(relative, *opts):
    cfg = add_maskformer2_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, relative))
    cfg.merge_from_list(list(opts))
    return cfg


def test_ade20k_recipe():
    for size in ("b0", "b1", "b2", "b3", "b4", "b5"):
        cfg = merged(f"ade20k/semantic-segmentation/segformer/segformer_{size}_512x512_160k.yaml")
        solver = cfg.SOLVER
        assert cfg.MODEL.META_ARCHITECTURE == "CheckedSemanticSegmentor" and cfg.MODEL.BACKBONE.NAME == "D2MixVisionTransformer"
        assert math.isclose(solver.BASE_LR * solver.BACKBONE_MULTIPLIER, 6e-5) and math.isclose(solver.BASE_LR, 6e-4)
        assert (solver.POLY_LR_POWER, solver.WARMUP_ITERS, solver.WARMUP_METHOD) == (1.0, 1500, "linear")
        assert (solver.WEIGHT_DECAY, solver.WEIGHT_DECAY_NORM, solver.IMS_PER_BATCH, solver.MAX_ITER) == (0.01, 0.0, 16, 160000)
        assert solver.OPTIMIZER == "ADAMW" and not solver.CLIP_GRADIENTS.ENABLED
        assert cfg.INPUT.CROP.SIZE == [512, 512] and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
        assert cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == (256 if size in ("b0", "b1") else 768)
        assert not cfg.TEST.SLIDING_WINDOW.ENABLED
    boost = merged("ade20k/semantic-segmentation/boostformer/boostformer_512x512_160k.yaml")
    assert boost.MODEL.BACKBONE.NAME == "D2BoostFormer" and boost.MODEL.SEM_SEG_HEAD.NAME == "BoostFormerHead"
    assert math.isclose(boost.SOLVER.BASE_LR * boost.SOLVER.BACKBONE_MULTIPLIER, 6e-5)


def test_cityscapes_recipe_slides():
    for path in ["cityscapes/semantic-segmentation/segformer/segformer_b2_1024x1024_160k.yaml",
                 "cityscapes/semantic-segmentation/boostformer/boostformer_1024x1024_160k.yaml"]:
        cfg = merged(path)
        assert cfg.INPUT.CROP.SIZE == [1024, 1024] and cfg.SOLVER.IMS_PER_BATCH == 8
        assert cfg.TEST.SLIDING_WINDOW.ENABLED
        assert (cfg.TEST.SLIDING_WINDOW.SIZE, cfg.TEST.SLIDING_WINDOW.STRIDE) == ([1024, 1024], [768, 768])
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19


def test_head_learns_ten_times_faster_norms_do_not_decay():
    cfg = merged("ade20k/semantic-segmentation/segformer/segformer_b0_512x512_160k.yaml", "MODEL.DEVICE", "cpu",
                 "MODEL.WEIGHTS", "", "MODEL.SEM_SEG_HEAD.NORM", "BN", *TINY[:6])
    model = build_model(cfg)
    groups = build_optimizer(cfg, model).param_groups
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert rate[id(model.backbone.block1[0].attn.q.weight)] == pytest.approx((6e-5, 0.01))
    assert rate[id(model.backbone.norm1.weight)] == pytest.approx((6e-5, 0.0))
    assert rate[id(model.sem_seg_head.classifier.weight)] == pytest.approx((6e-4, 0.01))
    assert rate[id(model.sem_seg_head.norm.weight)] == pytest.approx((6e-4, 0.0))


class _SlidingSeen(HookBase):
    """Records whether evaluation ran through SlidingWindowInference."""

    def __init__(self):
        self.windows = 0
        self._original = SlidingWindowInference.segment

    def before_train(self):
        hook = self

        def counting(module, inputs):
            hook.windows += 1
            return hook._original(module, inputs)

        SlidingWindowInference.segment = counting

    def after_train(self):
        SlidingWindowInference.segment = self._original


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ade20k_semantic_segformer_b0.yaml", "ade20k_semantic_boostformer.yaml",
                                    "cityscapes_semantic_segformer_b0.yaml"])
def test_synthetic_quick_config_trains_and_evaluates(config, registered_root, tmp_path):
    cfg = merged(os.path.join("synthetic", config), *TINY, "OUTPUT_DIR", str(tmp_path))
    cfg.freeze()
    seen = _SlidingSeen()
    trainer = train(cfg, extra_hooks=[seen])
    assert os.path.isfile(tmp_path / "model_final.pth")
    metric = "IoU" if config.startswith("cityscapes") else "mIoU"  # cityscapesscripts' name
    assert math.isfinite(trainer._last_eval_results["sem_seg"][metric])
    assert (seen.windows > 0) == config.startswith("cityscapes")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
