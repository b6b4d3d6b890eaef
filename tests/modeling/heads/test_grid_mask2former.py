"""Grid Mask2Former (upstream's pixel decoder and decoder on dense maps): parameter counts,
upstream checkpoint keys, the grid / point-cloud choice, training and inference per task."""

import pytest
import torch

from .heads_helpers import instances_from_masks, load_cfg  # noqa: I100  (registers the fake backbone first)

from detectron2.modeling import build_model

from aff_seg.checkpoint import AFFCheckpointer, CheckpointMismatchError
from aff_seg.modeling.pixel_decoder import MSDeformAttnPixelDecoder, MSDeformAttnPixelDecoderPc
from aff_seg.modeling.transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    MultiScaleMaskedTransformerDecoderPc,
    PositionEmbeddingSine,
)

R50_ADE = "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
R50_TOKENS_ADE = "ade20k/semantic-segmentation/maskformer2_R50_tokens_bs16_160k.yaml"

# a small grid model: ResNet-18, 32-wide heads, one decoder layer per level
TINY_GRID = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "2",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "4",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
]


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def r50_grid():
    torch.manual_seed(0)
    return build_model(load_cfg(R50_ADE))


# ----------------------------------------------------------------------------------------------
# upstream Mask2Former R50 checkpoint keys, written out from the upstream modules
# (facebookresearch/Mask2Former: detectron2 ResNet-50 with FrozenBN, MSDeformAttnPixelDecoder,
# MultiScaleMaskedTransformerDecoder) for K classes


def upstream_r50_keys(num_classes=150, d=256, queries=100, ffn=2048, enc_ffn=1024, layers=9, enc_layers=6):
    keys = {}

    def conv_bn(name, out_c, in_c, k):
        keys[f"{name}.weight"] = (out_c, in_c, k, k)
        for stat in ("weight", "bias", "running_mean", "running_var"):  # FrozenBatchNorm2d
            keys[f"{name}.norm.{stat}"] = (out_c,)

    def linear(name, out_c, in_c):
        keys[f"{name}.weight"] = (out_c, in_c)
        keys[f"{name}.bias"] = (out_c,)

    def norm(name, c=d):
        keys[f"{name}.weight"] = (c,)
        keys[f"{name}.bias"] = (c,)

    conv_bn("backbone.stem.conv1", 64, 3, 7)
    in_c = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        out_c = width * 4
        for i in range(blocks):
            prefix = f"backbone.res{stage + 2}.{i}"
            if i == 0:
                conv_bn(f"{prefix}.shortcut", out_c, in_c, 1)
            conv_bn(f"{prefix}.conv1", width, in_c if i == 0 else out_c, 1)
            conv_bn(f"{prefix}.conv2", width, width, 3)
            conv_bn(f"{prefix}.conv3", out_c, width, 1)
        in_c = out_c

    pd = "sem_seg_head.pixel_decoder"
    for i, c in enumerate((2048, 1024, 512)):  # res5, res4, res3
        keys[f"{pd}.input_proj.{i}.0.weight"] = (d, c, 1, 1)
        keys[f"{pd}.input_proj.{i}.0.bias"] = (d,)
        norm(f"{pd}.input_proj.{i}.1")
    keys[f"{pd}.transformer.level_embed"] = (3, d)
    for i in range(enc_layers):
        layer = f"{pd}.transformer.encoder.layers.{i}"
        linear(f"{layer}.self_attn.sampling_offsets", 8 * 3 * 4 * 2, d)
        linear(f"{layer}.self_attn.attention_weights", 8 * 3 * 4, d)
        linear(f"{layer}.self_attn.value_proj", d, d)
        linear(f"{layer}.self_attn.output_proj", d, d)
        norm(f"{layer}.norm1")
        linear(f"{layer}.linear1", enc_ffn, d)
        linear(f"{layer}.linear2", d, enc_ffn)
        norm(f"{layer}.norm2")
    keys[f"{pd}.mask_features.weight"] = (d, d, 1, 1)
    keys[f"{pd}.mask_features.bias"] = (d,)
    keys[f"{pd}.adapter_1.weight"] = (d, 256, 1, 1)
    norm(f"{pd}.adapter_1.norm")
    keys[f"{pd}.layer_1.weight"] = (d, d, 3, 3)
    norm(f"{pd}.layer_1.norm")

    pr = "sem_seg_head.predictor"
    for i in range(layers):
        for kind, attn in (("self_attention", "self_attn"), ("cross_attention", "multihead_attn")):
            base = f"{pr}.transformer_{kind}_layers.{i}"
            keys[f"{base}.{attn}.in_proj_weight"] = (3 * d, d)
            keys[f"{base}.{attn}.in_proj_bias"] = (3 * d,)
            linear(f"{base}.{attn}.out_proj", d, d)
            norm(f"{base}.norm")
        linear(f"{pr}.transformer_ffn_layers.{i}.linear1", ffn, d)
        linear(f"{pr}.transformer_ffn_layers.{i}.linear2", d, ffn)
        norm(f"{pr}.transformer_ffn_layers.{i}.norm")
    norm(f"{pr}.decoder_norm")
    keys[f"{pr}.query_feat.weight"] = (queries, d)
    keys[f"{pr}.query_embed.weight"] = (queries, d)
    keys[f"{pr}.level_embed.weight"] = (3, d)
    linear(f"{pr}.class_embed", num_classes + 1, d)
    for i in range(3):
        linear(f"{pr}.mask_embed.layers.{i}", d, d)
    keys["criterion.empty_weight"] = (num_classes + 1,)
    return keys


def test_r50_parameter_counts_equal_upstream(r50_grid):
    head = r50_grid.sem_seg_head
    assert type(head.pixel_decoder) is MSDeformAttnPixelDecoder
    assert type(head.predictor) is MultiScaleMaskedTransformerDecoder
    assert count(head.pixel_decoder) == 6_035_904
    assert count(head.predictor) == 14_497_431
    assert count(r50_grid.backbone) == 23_454_912
    frozen_affine = sum(b.numel() for n, b in r50_grid.backbone.named_buffers() if n.endswith((".weight", ".bias")))
    assert frozen_affine == 53_120


def test_upstream_r50_state_dict_loads_strictly(r50_grid):
    expected = upstream_r50_keys()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in expected.items()}
    model = r50_grid
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    key = "sem_seg_head.predictor.transformer_cross_attention_layers.8.multihead_attn.in_proj_weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_point_cloud_checkpoint_report_names_what_did_not_match(r50_grid, tmp_path):
    """A checkpoint of the other variant (R50 tokens on the point-cloud heads) loaded into the
    grid model: strict loading refuses it with a table of the keys that differ."""
    torch.manual_seed(0)
    tokens = build_model(load_cfg(R50_TOKENS_ADE))
    assert type(tokens.sem_seg_head.pixel_decoder) is MSDeformAttnPixelDecoderPc
    assert type(tokens.sem_seg_head.predictor) is MultiScaleMaskedTransformerDecoderPc
    path = tmp_path / "tokens.pth"
    torch.save({"model": tokens.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as e:
        AFFCheckpointer(r50_grid).load(str(path))
    report = str(e.value)
    pd = "sem_seg_head.pixel_decoder"
    # same names, other shapes (Linear vs 1x1 conv)
    for name in (f"{pd}.mask_features.weight", f"{pd}.input_proj.0.0.weight"):
        assert any(line.startswith(f"| {name} ") and "shape differs" in line for line in report.splitlines()), name
    # missing (the grid FPN convs) and unexpected (the point-cloud FPN, the Shepard powers)
    for name in (f"{pd}.adapter_1.norm", f"{pd}.layer_1.weight", f"{pd}.layer_1.norm",
                 f"{pd}.adapter_1.0", f"{pd}.layer_1.0", "shepard_power", "backbone.resnet.res5"):
        assert name in report, name


# ----------------------------------------------------------------------------------------------
# the choice and bad input


def test_the_backbone_chooses_the_variant():
    cfg = load_cfg(R50_ADE, *TINY_GRID)
    model = build_model(cfg)
    assert model.sem_seg_head.output_format == "maps"
    assert type(model.sem_seg_head.predictor) is MultiScaleMaskedTransformerDecoder
    cfg = load_cfg(R50_TOKENS_ADE, *TINY_GRID)
    model = build_model(cfg)
    assert model.sem_seg_head.output_format == "tokens"
    assert type(model.sem_seg_head.pixel_decoder) is MSDeformAttnPixelDecoderPc


def test_point_cloud_decoder_with_a_map_backbone_is_refused():
    cfg = load_cfg(R50_ADE, *TINY_GRID, "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoderPc")
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME=.*build_resnet_backbone"):
        build_model(cfg)
    cfg = load_cfg(R50_ADE, *TINY_GRID,
                   "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MultiScaleMaskedTransformerDecoderPc")
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"):
        build_model(cfg)


def test_grid_decoder_with_a_token_backbone_is_refused(monkeypatch):
    """Outside the automatic choice (here: the name taken out of TOKEN_VARIANTS) a token backbone
    cannot take a grid pixel decoder."""
    from aff_seg.modeling import variants

    monkeypatch.delitem(variants.TOKEN_VARIANTS, "MSDeformAttnPixelDecoder")
    with pytest.raises(ValueError, match="PIXEL_DECODER_NAME='MSDeformAttnPixelDecoder' reads maps.*D2ResNetTokens"):
        build_model(load_cfg(R50_TOKENS_ADE, *TINY_GRID))


def test_size_divisibility_the_backbone_cannot_take_is_refused():
    cfg = load_cfg(R50_TOKENS_ADE, *TINY_GRID, "MODEL.MASK_FORMER.SIZE_DIVISIBILITY", "16")
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.SIZE_DIVISIBILITY=16.*multiple of 32"):
        build_model(cfg)


def test_position_encoding_is_upstreams():
    """y half first, interleaved sin/cos, rows and columns numbered from 1 over their count."""
    pe = PositionEmbeddingSine(4, normalize=True)(torch.zeros(1, 1, 2, 3))
    assert pe.shape == (1, 8, 2, 3)
    y = torch.tensor([1.0, 2.0]) / (2 + 1e-6) * 2 * torch.pi
    x = torch.tensor([1.0, 2.0, 3.0]) / (3 + 1e-6) * 2 * torch.pi
    torch.testing.assert_close(pe[0, 0, :, 0], y.sin())
    torch.testing.assert_close(pe[0, 3, :, 1], (y / 100.0).cos())  # channel 3: j = 3, w = 10000^(-2/4)
    torch.testing.assert_close(pe[0, 4, 1, :], x.sin())


# ----------------------------------------------------------------------------------------------
# training and inference, each task's R50 config shrunk


def toy_batch(h=64, w=96, classes=(1, 3, 0)):
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, : h // 2] = True
    masks[1, h // 2:, : w // 3] = True
    masks[2, h // 2:, w // 3:] = True
    return [{"image": torch.rand(3, h, w) * 255, "instances": instances_from_masks(masks, list(classes))}]


TINY_SWIN = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.SWIN.NUM_HEADS", "[1, 2, 2, 4]",
             "MODEL.SWIN.WINDOW_SIZE", "4"]


@pytest.mark.parametrize("config,output", [
    (R50_ADE, "sem_seg"),
    ("ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml", "sem_seg"),
    ("coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml", "panoptic_seg"),
    ("coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml", "instances"),
])
def test_grid_model_trains_and_infers(config, output):
    torch.manual_seed(0)
    model = build_model(load_cfg(config, *TINY_GRID, *TINY_SWIN)).train()
    losses = model(toy_batch())
    assert len(losses) == 3 * 4  # final + 3 auxiliary predictions
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    head = model.sem_seg_head
    for p in (head.predictor.query_feat.weight, head.pixel_decoder.input_proj[0][0].weight,
              head.pixel_decoder.transformer.encoder.layers[0].self_attn.value_proj.weight,
              next(model.backbone.parameters())):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.rand(3, 50, 70) * 255, "height": 100, "width": 140}])
    assert output in result
    if output == "sem_seg":
        assert result["sem_seg"].shape == (150, 100, 140)
    elif output == "panoptic_seg":
        assert result["panoptic_seg"][0].shape == (100, 140)
    else:
        assert result["instances"].image_size == (100, 140)
