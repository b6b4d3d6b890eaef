"""Mixed precision: under autocast the sampling geometry, Shepard weights and aggregation of
the deformable attention stay float32, the linear layers run in bf16 within bf16 accuracy of
the float32 model, and the losses are float32."""
import pytest
import torch

from .heads_helpers import instances_from_masks, tiny_cfg  # noqa: I100  (registers the fake backbone first)

from detectron2.modeling import build_model

import clusten


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model_and_features():
    torch.manual_seed(0)
    cfg = tiny_cfg(num_classes=5, dim=128, queries=20, dec_layers=4, enc_layers=2)
    model = build_model(cfg).eval()
    for m in model.modules():  # realistic, non-zero sampling offsets and attention logits
        if hasattr(m, "sampling_offsets"):
            with torch.no_grad():
                m.sampling_offsets.weight.normal_(0, 0.02)
                m.attention_weights.weight.normal_(0, 0.02)
    with torch.no_grad():
        features = model.backbone(torch.randn(2, 3, 96, 128))
    return model, features


def run_head(model, features):
    pixel_decoder, predictor = model.sem_seg_head.pixel_decoder, model.sem_seg_head.predictor
    mask_features, mf_pos, _, ms_feats, ms_poss = pixel_decoder.forward_features(features)
    return mask_features, predictor(ms_feats, ms_poss, mask_features, mf_pos, features["res2_spatial_shape"])


def test_deformable_geometry_stays_float32_under_autocast(model_and_features, monkeypatch):
    model, features = model_and_features
    seen = []
    original = clusten.msdetrpc

    def spy(nn_idx, nn_weight, attn, value):
        seen.append((nn_weight.dtype, attn.dtype, value.dtype))
        return original(nn_idx, nn_weight, attn, value)

    monkeypatch.setattr(clusten, "msdetrpc", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, _ = run_head(model, features)
    assert len(seen) == 2  # one call per encoder layer
    assert all(dtypes == (torch.float32,) * 3 for dtypes in seen)
    assert mask_features.dtype == torch.bfloat16  # the linear layers did run in low precision


def test_bf16_head_is_within_bf16_accuracy(model_and_features):
    model, features = model_and_features
    with torch.no_grad():
        ref_features, ref = run_head(model, features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_features, low = run_head(model, features)
    assert rel_err(low_features, ref_features) < 2e-2
    assert rel_err(low["pred_logits"], ref["pred_logits"]) < 3e-2
    assert rel_err(low["pred_masks"], ref["pred_masks"]) < 8e-2
    agreement = ((low["pred_masks"] > 0) == (ref["pred_masks"] > 0)).float().mean()
    assert agreement > 0.97


def test_losses_are_float32_under_autocast():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_classes=3)).train()
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[0, :16], masks[1, 16:] = True, True
    batch = [{"image": torch.rand(3, 32, 48) * 255, "instances": instances_from_masks(masks, [0, 2])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
