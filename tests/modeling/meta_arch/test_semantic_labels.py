"""Semantic inference as a label map, a few rows at a time (MODEL.MASK_FORMER.TEST.SEMANTIC_LABELS_ONLY)."""
import os

import pytest
import torch
from torch.nn import functional as F

import aff_seg
from aff_seg.modeling.meta_arch.maskformer_model import SEMANTIC_LABEL_ROWS, semantic_labels
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "synthetic", "ade20k_semantic.yaml")


def full_scores(mask_cls, mask_pred, padded_hw, image_size, output_hw, before):
    """The K x H x W scores as MaskFormer.forward computes them."""
    masks = F.interpolate(mask_pred[None], size=padded_hw, mode="bilinear", align_corners=False)[0]
    probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    if before:
        masks = sem_seg_postprocess(masks, image_size, *output_hw)
        return torch.einsum("qk,qhw->khw", probs, masks.sigmoid())
    scores = torch.einsum("qk,qhw->khw", probs, masks.sigmoid())
    return sem_seg_postprocess(scores, image_size, *output_hw)


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("output_hw", [(90, 70), (90, 80), (151, 97), (45, 35)])
def test_labels_equal_the_argmax_of_the_full_scores(before, output_hw):
    torch.manual_seed(0)
    q, k, h, w = 6, 5, 24, 20  # stride-4 canvas of a 96 x 80 padded input holding a 90 x 70 image
    mask_cls, mask_pred = torch.randn(q, k + 1) * 3, torch.randn(q, h, w) * 4
    args = (mask_cls, mask_pred, (96, 80), (90, 70), output_hw, before)
    labels = semantic_labels(*args)
    expected = full_scores(*args).argmax(0)
    assert labels.shape == expected.shape == output_hw
    assert output_hw[0] > SEMANTIC_LABEL_ROWS  # several row chunks
    assert (labels == expected).float().mean() >= 0.999


def _model(**overrides):
    cfg = get_cfg()
    aff_seg.add_maskformer2_config(cfg)
    cfg.merge_from_file(CONFIG)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_model_returns_the_label_map():
    image = torch.randint(0, 255, (3, 70, 90), dtype=torch.uint8)
    inputs = [{"image": image, "height": 140, "width": 180}]
    with torch.no_grad():
        scores = _model()(inputs)[0]["sem_seg"]
        labels = _model(**{"MODEL.MASK_FORMER.TEST.SEMANTIC_LABELS_ONLY": True})(inputs)[0]
    assert set(labels) == {"sem_seg_labels"}
    assert labels["sem_seg_labels"].shape == (140, 180)
    assert (labels["sem_seg_labels"] == scores.argmax(0)).float().mean() >= 0.999


def test_labels_only_refuses_panoptic():
    with pytest.raises(ValueError, match="SEMANTIC_LABELS_ONLY"):
        _model(**{"MODEL.MASK_FORMER.TEST.SEMANTIC_LABELS_ONLY": True, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True})
