"""The tools on the grid Mask2Former (synthetic grid config: ResNet-18 maps, upstream heads) and
on FASeg (the same with FASeg's heads): FLOPs including the deformable attention, the demo, the
benchmark."""
import os

import cv2
import numpy as np
import pytest
import torch

from .conftest import ROOT

GRID = os.path.join(ROOT, "configs/synthetic/ade20k_semantic_grid.yaml")
FASEG_GRID = os.path.join(ROOT, "configs/synthetic/ade20k_semantic_faseg_grid.yaml")
# 32-wide heads, 2 heads, 2 encoder layers (the config's), one decoder layer per level
GRID_OPTS = ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
             "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
             "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
             "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]


class PixelDecoder(torch.nn.Module):
    """The grid pixel decoder as a module of tensors (what the tracer needs)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, res2, res3, res4, res5):
        return self.decoder.forward_features({"res2": res2, "res3": res3, "res4": res4, "res5": res5})[0]


@pytest.mark.parametrize("config", [GRID, FASEG_GRID], ids=["mask2former", "faseg"])
def test_flops_count_the_deformable_attention(analyze_model, config):
    from detectron2.modeling import build_model

    cfg = analyze_model.setup_cfg(config, GRID_OPTS)
    model = build_model(cfg).eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
        inputs = tuple(features[f"res{i}"] for i in range(2, 6))
        ops = analyze_model.flop_analysis(PixelDecoder(model.sem_seg_head.pixel_decoder), inputs).by_operator()
        excluded = analyze_model.flop_analysis(PixelDecoder(model.sem_seg_head.pixel_decoder), inputs,
                                               count_custom_ops=False).by_operator()
    # every encoder layer: res5 2x2 + res4 4x4 + res3 8x8 queries, 2 heads x 3 levels x 4 points,
    # 16 channels per head, 5 multiply-adds per sample and channel
    queries = 4 + 16 + 64
    assert ops["ms_deform_attn"] == cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS * 5 * queries * 2 * 3 * 4 * 16
    assert "ms_deform_attn" not in excluded


def test_demo_draws_a_grid_prediction_and_refuses_tokens(demo, tmp_path, caplog):
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    out = tmp_path / "out.png"
    assert demo.main(["--config-file", GRID, "--input", str(tmp_path / "a.png"), "--output", str(out),
                      "--opts", *GRID_OPTS]) == 0
    assert cv2.imread(str(out)).shape[:2] == (60, 90)
    rc = demo.main(["--config-file", GRID, "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "t"),
                    "--show-tokens", "--opts", *GRID_OPTS])
    assert rc == 1  # the image is skipped with the reason


@pytest.mark.parametrize("config", [GRID, FASEG_GRID], ids=["mask2former", "faseg"])
def test_benchmark_runs_the_grid_model(benchmark, config):
    from analyze_model import setup_cfg

    cfg = setup_cfg(config, GRID_OPTS)
    result = benchmark.run(cfg, ["inference", "train"], input_size=(64, 64), warmup=0, iters=1)
    assert result["inference"]["images_per_s"] > 0 and result["train"]["images_per_s"] > 0


def test_demo_draws_a_faseg_prediction(demo, tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    out = tmp_path / "out.png"
    assert demo.main(["--config-file", FASEG_GRID, "--input", str(tmp_path / "a.png"), "--output", str(out),
                      "--opts", *GRID_OPTS]) == 0
    assert cv2.imread(str(out)).shape[:2] == (60, 90)
