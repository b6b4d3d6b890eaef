"""Sizes, parameter counts, checkpoint key names/shapes, config and input errors of the AFF backbone."""
import pytest
import torch

import aff_seg  # noqa: F401  (compat fixes before detectron2)
from aff_seg import add_maskformer2_config
from aff_seg.modeling.backbone import AFF, AFF_SIZES, AutoFocusFormer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

# published parameter counts in millions (the paper's table of variants): classification model / segmentation backbone
PUBLISHED = {"mini": (6.75, 6.37), "tiny": (27.02, 26.51), "small": (42.61, 41.85), "base": (75.34, 74.32)}
# the paper's variants: embed dims, depths, heads, mlp ratio, layer scale on
VARIANTS = {
    "mini": ((32, 128, 256, 384), (2, 2, 6, 2), (2, 4, 8, 16), 2.0, False),
    "tiny": ((64, 128, 256, 512), (3, 4, 18, 5), (2, 4, 8, 16), 3.0, False),
    "small": ((96, 192, 384, 768), (3, 4, 18, 2), (3, 6, 12, 24), 3.0, True),
    "base": ((128, 256, 512, 1024), (3, 4, 18, 2), (4, 8, 16, 32), 3.0, True),
}


def build_meta(size):
    with torch.device("meta"):
        return AFF(**AFF_SIZES[size])


def expected_keys(size):
    """The official checkpoint's backbone keys and shapes, written out from the official checkpoints."""
    dims, depths, heads, mlp_ratio, layer_scale = VARIANTS[size.replace("_1_5th", "")]
    hidden = [int(c * mlp_ratio) for c in dims]
    keys = {
        "patch_embed.proj1.weight": (dims[0] // 2, 3, 3, 3), "patch_embed.proj1.bias": (dims[0] // 2,),
        "patch_embed.bn.weight": (dims[0] // 2,), "patch_embed.bn.bias": (dims[0] // 2,),
        "patch_embed.bn.running_mean": (dims[0] // 2,), "patch_embed.bn.running_var": (dims[0] // 2,),
        "patch_embed.bn.num_batches_tracked": (),
        "patch_embed.proj2.weight": (dims[0], dims[0] // 2, 3, 3), "patch_embed.proj2.bias": (dims[0],),
        "patch_embed.norm.weight": (dims[0],), "patch_embed.norm.bias": (dims[0],),
    }
    for i, (c, depth, h, hid) in enumerate(zip(dims, depths, heads, hidden)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update({
                p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                p + "attn.blank_k": (c,), p + "attn.blank_v": (c,),
                p + "attn.q.weight": (c, c), p + "attn.q.bias": (c,),
                p + "attn.kv.weight": (2 * c, c), p + "attn.kv.bias": (2 * c,),
                p + "attn.pos_embed.weight": (h, 5), p + "attn.pos_embed.bias": (h,),
                p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (hid, c), p + "mlp.fc1.bias": (hid,),
                p + "mlp.fc2.weight": (c, hid), p + "mlp.fc2.bias": (c,),
            })
            if layer_scale:
                keys.update({p + "gamma1": (c,), p + "gamma2": (c,)})
        if i < 3:
            p = f"layers.{i}.downsample."
            keys.update({
                p + "weight_net.0.weight": (4, 5), p + "weight_net.0.bias": (4,),
                p + "weight_net.1.weight": (4,), p + "weight_net.1.bias": (4,),
                p + "norm.weight": (4 * c,), p + "norm.bias": (4 * c,),
                p + "linear.weight": (dims[i + 1], 4 * c), p + "linear.bias": (dims[i + 1],),
                f"layers.{i}.prob_net.weight": (1, c), f"layers.{i}.prob_net.bias": (1,),
            })
        keys.update({f"norm{i}.weight": (c,), f"norm{i}.bias": (c,)})
    return keys


@pytest.mark.parametrize("size", sorted(AFF_SIZES))
def test_state_dict_keys_and_shapes_match_official(size):
    got = {k: tuple(v.shape) for k, v in build_meta(size).state_dict().items()}
    assert got == expected_keys(size)


def test_mini_has_265_keys():
    assert len(build_meta("mini").state_dict()) == 265


@pytest.mark.parametrize("size", sorted(AFF_SIZES))
def test_parameter_counts_match_published(size):
    model = build_meta(size)
    seg = sum(p.numel() for p in model.parameters())
    last = model.num_features[-1]
    norms = sum(p.numel() for i in range(4) for p in getattr(model, f"norm{i}").parameters())
    cls = seg - norms + 2 * last + 1000 * last + 1000  # + final norm + head
    published_cls, published_seg = PUBLISHED[size.replace("_1_5th", "")]
    assert round(seg / 1e6, 2) == published_seg
    assert round(cls / 1e6, 2) == published_cls


def test_heads_not_dividing_dims_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_heads\[0\]=3 does not divide embed_dim\[0\]=32"):
        AFF(embed_dim=(32, 128, 256, 384), num_heads=(3, 6, 12, 24))


def test_wrong_channel_count_and_small_image_are_clear_errors():
    model = AFF(**AFF_SIZES["mini"]).eval()
    with pytest.raises(ValueError, match="b x 3 x H x W"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 32 x 32"):
        model(torch.zeros(1, 3, 31, 64))


def mini_cfg():
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "AutoFocusFormer"
    cfg.MODEL.AFF.EMBED_DIM = [32, 128, 256, 384]
    cfg.MODEL.AFF.NUM_HEADS = [2, 4, 8, 16]
    cfg.MODEL.AFF.DROP_PATH_RATE = 0.0
    return cfg


def test_registered_backbone_builds_from_cfg():
    backbone = build_backbone(mini_cfg())
    assert isinstance(backbone, AutoFocusFormer)
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (32, 4), "res3": (128, 8), "res4": (256, 16), "res5": (384, 32)}
    out = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, 4, 384) and out["res2_spatial_shape"] == (16, 16)


def test_default_cfg_heads_error_and_channel_check():
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "AutoFocusFormer"
    with pytest.raises(ValueError, match="does not divide"):
        build_backbone(cfg)
    backbone = AutoFocusFormer(mini_cfg(), ShapeSpec(channels=4))
    with pytest.raises(ValueError, match="b x 4 x H x W"):
        backbone(torch.zeros(1, 3, 64, 64))
