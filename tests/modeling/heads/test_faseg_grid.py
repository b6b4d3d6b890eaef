"""FASeg on dense maps: parameter counts, an upstream Mask2Former checkpoint's load report, the
layer schedule and high-resolution key counts, bad input, and a training step of FASeg R50."""
import copy

import pytest
import torch

from .heads_helpers import load_cfg  # noqa: I100  (registers the fake backbone first)
from .test_grid_mask2former import TINY_GRID, count, toy_batch, upstream_r50_keys

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_sem_seg_head

import aff_seg.modeling.matcher as matcher_module
from aff_seg.checkpoint import AFFCheckpointer, CheckpointMismatchError
from aff_seg.modeling.meta_arch import MaskFormerHeadFASeg
from aff_seg.modeling.pixel_decoder import MSDeformAttnPixelDecoder4ScalesFASeg
from aff_seg.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoderFASeg
from aff_seg.modeling.transformer_decoder.faseg import HR, windows

FASEG_ADE = "ade20k/semantic-segmentation/faseg_r50.yaml"
FASEG_CITYSCAPES = "cityscapes/semantic-segmentation/faseg_r50.yaml"
R50_SHAPES = {f"res{i + 2}": ShapeSpec(channels=256 * 2 ** i, stride=4 * 2 ** i) for i in range(4)}


@pytest.fixture(scope="module")
def faseg_r50():
    torch.manual_seed(0)
    return build_model(load_cfg(FASEG_ADE))


def test_parameter_counts(faseg_r50):
    head = faseg_r50.sem_seg_head
    assert type(head) is MaskFormerHeadFASeg
    assert type(head.pixel_decoder) is MSDeformAttnPixelDecoder4ScalesFASeg
    assert type(head.predictor) is MultiScaleMaskedTransformerDecoderFASeg
    assert count(head.pixel_decoder) == 6_112_448
    assert count(head.predictor) == 20_944_279
    assert count(faseg_r50) == 50_511_639
    cityscapes = build_sem_seg_head(load_cfg(FASEG_CITYSCAPES), R50_SHAPES)
    assert count(cityscapes.predictor) == 20_910_612


def test_upstream_mask2former_checkpoint_report(faseg_r50):
    """An upstream Mask2Former R50 state_dict: FASeg's new modules are missing and the decoder's
    level embedding has 3 rows instead of 4; nothing else differs (the strict load says so)."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in upstream_r50_keys().items()}
    with pytest.raises(CheckpointMismatchError) as error:
        AFFCheckpointer(copy.deepcopy(faseg_r50))._load_model({"model": state, "__author__": "test"})
    report = str(error.value)
    pd, pr = "sem_seg_head.pixel_decoder", "sem_seg_head.predictor"
    expected = {f"{pd}.input_proj.3.{m}.{p}" for m in (0, 1) for p in ("weight", "bias")}
    expected |= {f"{pd}.pos_linear.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    expected |= {f"{pr}.adapt_pos2d.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    expected |= {k for k in faseg_r50.state_dict() if k.startswith(f"{pr}.transformer_")
                 and int(k.split(".")[3]) >= 9}
    assert len(expected) == 16 + 4 * 18  # 4 new layers of 18 tensors each
    assert f"{len(expected)} missing, 0 unexpected, 1 of another shape" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| sem_seg_head")}
    assert {k for k, line in rows.items() if "missing in the file" in line} == expected
    assert [k for k, line in rows.items() if "shape differs" in line] == [f"{pr}.level_embed.weight"]
    assert "(3, 256)" in rows[f"{pr}.level_embed.weight"] and "(4, 256)" in rows[f"{pr}.level_embed.weight"]


def small_decoder(**kwargs):
    settings = dict(num_classes=3, hidden_dim=16, num_queries=4, nheads=2, dim_feedforward=32, dec_layers=13,
                    pre_norm=False, mask_dim=16, enforce_input_project=False, omega_rate=32,
                    attn_mask_threshold=0.15, init_pool_threshold=0.5, init_pool_complement=True, hr_every=4)
    settings.update(kwargs)
    return MultiScaleMaskedTransformerDecoderFASeg(16, **settings)


def decoder_inputs(h, w, dim=16):
    sizes = [(h // s, w // s) for s in (32, 16, 8, 4)]
    maps = [torch.randn(1, dim, *hw) for hw in sizes]
    pos = [torch.randn(1, dim, *hw) for hw in sizes]
    return maps, torch.randn(1, dim, h // 4, w // 4), pos


@pytest.mark.parametrize("h,w,hr_keys", [(512, 512, 512), (640, 640, 768), (512, 1024, 1024), (128, 128, 64)])
def test_layer_schedule_and_high_resolution_keys(monkeypatch, h, w, hr_keys):
    """k = (h/32)(w/32) // 32 windows of 8 x 8 (at least one: at 128^2 the original has none)."""
    torch.manual_seed(0)
    decoder = small_decoder()
    calls = []
    attend = type(decoder.transformer_cross_attention_layers[0]).attend

    def spy(layer, tgt, memory, memory_mask, pos, query_pos, need_weights=True):
        calls.append((memory.shape[0], memory_mask is None, torch.equal(query_pos[:, 0], decoder.query_embed.weight)))
        return attend(layer, tgt, memory, memory_mask, pos, query_pos, need_weights)

    monkeypatch.setattr(type(decoder.transformer_cross_attention_layers[0]), "attend", spy)
    maps, mask_features, pos = decoder_inputs(h, w)
    out = decoder(maps, mask_features, pos)
    assert len(out["aux_outputs"]) == 13 and out["pred_masks"].shape == (1, 4, h // 4, w // 4)
    n = [(h // s) * (w // s) for s in (32, 16, 8)]
    expected = [n[level] if level != HR else hr_keys for level in decoder.schedule]
    assert decoder.schedule == [0, 1, 2, HR] * 3 + [0]
    assert [c[0] for c in calls] == expected
    # HR layers: no mask and the static queries; the others: masked, dynamic queries
    assert [c[1] for c in calls] == [c[2] for c in calls] == [level == HR for level in decoder.schedule]


def test_high_resolution_windows_follow_the_coarse_scores():
    """The HR memory is the 8 x 8 block of the 1/4 map under each top-scoring 1/32 cell."""
    decoder = small_decoder()
    fine = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16)
    cells = windows(fine, (2, 2))  # b x 4 x 64 x c
    top = torch.tensor([[3, 0]])
    memory = decoder._gather_windows(cells, top)  # 128 x b x c
    torch.testing.assert_close(memory[:64, 0, 0], fine[0, 0, 8:, 8:].reshape(-1))
    torch.testing.assert_close(memory[64:, 0, 1], fine[0, 1, :8, :8].reshape(-1))
    with pytest.raises(ValueError, match="SIZE_DIVISIBILITY"):
        windows(torch.zeros(1, 2, 12, 16), (2, 2))


def test_pre_norm_runs():
    torch.manual_seed(0)
    maps, mask_features, pos = decoder_inputs(128, 128)
    out = small_decoder(pre_norm=True, dec_layers=5)(maps, mask_features, pos)
    assert torch.isfinite(out["pred_logits"]).all()


def test_res2_channels_and_half_precision_inputs():
    """res2 need not have half res3's channels (the original assumes it), and an fp16 res2 (AMP)
    is cast to float (the original passes it to a float32 conv)."""
    torch.manual_seed(0)
    cfg = load_cfg(FASEG_ADE, "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
                   "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1")
    shapes = {"res2": ShapeSpec(channels=32, stride=4), "res3": ShapeSpec(channels=128, stride=8),
              "res4": ShapeSpec(channels=256, stride=16), "res5": ShapeSpec(channels=384, stride=32)}
    decoder = MSDeformAttnPixelDecoder4ScalesFASeg(cfg, shapes)
    features = {k: torch.randn(1, v.channels, 64 // v.stride, 64 // v.stride) for k, v in shapes.items()}
    features["res2"] = features["res2"].half()
    mask_features, _, levels, pos = decoder.forward_features(features)
    assert mask_features.dtype == torch.float32 and mask_features.shape == (1, 32, 16, 16)
    assert [tuple(p.shape[-2:]) for p in pos] == [tuple(x.shape[-2:]) for x in levels] == [(2, 2), (4, 4), (8, 8),
                                                                                            (16, 16)]
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.IN_FEATURES"):
        MSDeformAttnPixelDecoder4ScalesFASeg(cfg, {k: v for k, v in shapes.items() if k != "res2"})


def test_faseg_names_with_a_token_backbone_are_refused():
    cfg = load_cfg(FASEG_ADE, "MODEL.BACKBONE.NAME", "build_fake_token_backbone")
    with pytest.raises(ValueError, match="PIXEL_DECODER_NAME"):
        build_model(cfg)


def tiny_faseg(dec_layers=6):
    cfg = load_cfg(FASEG_ADE, *TINY_GRID, "MODEL.MASK_FORMER.DEC_LAYERS", str(dec_layers), "SOLVER.AMP.ENABLED", "False")
    return build_model(cfg).train()


def test_matcher_failures_are_raised(monkeypatch):
    """The original's matcher prints and drops a failed assignment, shifting the later images'
    matches; here the error reaches the caller."""
    def fail(cost):
        raise ValueError("cost matrix is infeasible")

    monkeypatch.setattr(matcher_module, "linear_sum_assignment", fail)
    with pytest.raises(ValueError, match="infeasible"):
        tiny_faseg()(toy_batch())


@pytest.mark.slow
def test_faseg_r50_trains_on_cpu(faseg_r50):
    """FASeg R50 at its real size: forward and backward of one 64 x 96 image; 14 predictions."""
    torch.manual_seed(0)
    model = faseg_r50.train()
    model.zero_grad()
    losses = model(toy_batch())
    assert len(losses) == 3 * 14
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    head = model.sem_seg_head
    for p in (head.pixel_decoder.pos_linear[3].weight, head.pixel_decoder.input_proj[3][0].weight,
              head.predictor.adapt_pos2d[0].weight, head.predictor.transformer_cross_attention_layers[3].
              multihead_attn.in_proj_weight, head.predictor.level_embed.weight, next(model.backbone.parameters())):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.rand(3, 50, 70) * 255, "height": 100, "width": 140}])
    assert result["sem_seg"].shape == (150, 100, 140)


def test_tiny_faseg_trains():
    """A shrunk FASeg R18 on a tiny batch (the quick test of the grid FASeg path)."""
    torch.manual_seed(0)
    model = tiny_faseg()
    losses = model(toy_batch())
    assert len(losses) == 3 * 6
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.adapt_pos2d[2].weight.grad.abs().sum() > 0
