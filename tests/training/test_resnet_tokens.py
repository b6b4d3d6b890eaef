"""The R50 baseline adapter: ResNet grid features as tokens for the point-cloud heads."""
import os

import pytest
import torch

from aff_seg.modeling.backbone.resnet_tokens import grid_tokens

from .conftest import CONFIGS, TINY_OPTS, semantic_train_and_infer


def test_grid_tokens_positions_are_cell_centres_in_stride4_units():
    feature = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3)
    tokens, pos = grid_tokens(feature, stride=8)
    assert tokens.shape == (2, 6, 3) and pos.shape == (2, 6, 2)
    assert torch.equal(tokens[1, 4], feature[1, :, 1, 1])  # row-major: token 4 = (y 1, x 1)
    assert pos[0, :, 0].tolist() == [0.5, 2.5, 4.5] * 2  # x
    assert pos[0, :, 1].tolist() == [0.5] * 3 + [2.5] * 3  # y
    _, pos4 = grid_tokens(feature, stride=4)
    assert pos4[0, 4].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="stride"):
        grid_tokens(feature, stride=6)


@pytest.mark.slow
def test_r50_tokens_train_and_infer_through_the_point_cloud_heads():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from aff_seg import add_maskformer2_config

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "ade20k/semantic-segmentation/maskformer2_R50_tokens_bs16_160k.yaml"))
    cfg.merge_from_list(TINY_OPTS + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
                                     "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    model = build_model(cfg)
    out = model.backbone(torch.zeros(1, 3, 64, 96))
    assert out["res2"].shape == (1, 16 * 24, 64) and out["res5"].shape == (1, 2 * 3, 512)
    assert out["res3_spatial_shape"] == (16, 24) and out["res5_pos"].shape == (1, 6, 2)

    result = semantic_train_and_infer(model, 64, 64)
    assert model.backbone.resnet.stem.conv1.weight.grad is not None
    assert result["sem_seg"].shape == (150, 32, 32)

