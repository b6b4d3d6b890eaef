"""Focal Transformer + Mask2Former: a training step and inference with the grid decoders (dense
maps) and with the point-cloud decoders (the maps as grid tokens)."""
import os

import pytest
import torch

from aff_seg import load_config

from .conftest import CONFIGS, TINY_OPTS, semantic_train_and_infer

FOCAL_TINY_OPTS = ["MODEL.FOCAL.EMBED_DIM", "16", "MODEL.FOCAL.DEPTHS", "[1, 1, 1, 1]",
                   "MODEL.FOCAL.NUM_HEADS", "[1, 2, 2, 4]"]


@pytest.mark.parametrize("config,backbone,decoder", [
    ("ade20k_semantic_focal_grid.yaml", "D2FocalTransformer", "MultiScaleMaskedTransformerDecoder"),
    ("ade20k_semantic_focal_point_cloud.yaml", "D2FocalTransformerTokens", "MultiScaleMaskedTransformerDecoderPc"),
])
def test_focal_trains_and_infers_through_both_heads(config, backbone, decoder):
    from detectron2.modeling import build_model

    cfg = load_config(os.path.join(CONFIGS, "synthetic", config), TINY_OPTS + FOCAL_TINY_OPTS)
    model = build_model(cfg)
    assert type(model.backbone).__name__ == backbone
    assert type(model.sem_seg_head.predictor).__name__ == decoder
    result = semantic_train_and_infer(model)
    assert model.backbone.layers[0].blocks[0].attn.relative_position_bias_table_to_neighbors.grad.abs().sum() > 0
    assert result["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 32, 48)
