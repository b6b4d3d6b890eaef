"""D2SwinTransformer: Mask2Former's checkpoint key names and parameter counts, output maps, the
shifted-window mask, and the grid head on it."""
import pytest
import torch

import aff_seg
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from aff_seg.modeling.backbone.swin import BasicLayer, D2SwinTransformer


def swin_cfg(*opts):
    cfg = get_cfg()
    aff_seg.add_maskformer2_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


def upstream_swin_keys(embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7):
    """The state_dict of upstream's D2SwinTransformer (Swin's own names), written out."""
    keys = {"patch_embed.proj.weight": (embed, 3, 4, 4), "patch_embed.proj.bias": (embed,),
            "patch_embed.norm.weight": (embed,), "patch_embed.norm.bias": (embed,)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2 ** i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            for norm in ("norm1", "norm2"):
                keys[f"{b}.{norm}.weight"] = keys[f"{b}.{norm}.bias"] = (c,)
            keys[f"{b}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, h)
            keys[f"{b}.attn.relative_position_index"] = (window * window, window * window)
            keys[f"{b}.attn.qkv.weight"], keys[f"{b}.attn.qkv.bias"] = (3 * c, c), (3 * c,)
            keys[f"{b}.attn.proj.weight"], keys[f"{b}.attn.proj.bias"] = (c, c), (c,)
            keys[f"{b}.mlp.fc1.weight"], keys[f"{b}.mlp.fc1.bias"] = (4 * c, c), (4 * c,)
            keys[f"{b}.mlp.fc2.weight"], keys[f"{b}.mlp.fc2.bias"] = (c, 4 * c), (c,)
        if i < len(depths) - 1:
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            keys[f"layers.{i}.downsample.norm.weight"] = keys[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
        keys[f"norm{i}.weight"] = keys[f"norm{i}.bias"] = (c,)
    return keys


def test_swin_tiny_keys_and_parameter_count():
    model = D2SwinTransformer(swin_cfg(), ShapeSpec(channels=3))
    expected = upstream_swin_keys()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 27_520_698
    index = model.state_dict()["layers.0.blocks.0.attn.relative_position_index"]
    # offset (dy, dx) -> (dy + 6) * 13 + (dx + 6): position 0 to itself is the centre, 84
    assert index[0, 0] == 84 and index[0, 1] == 83 and index[0, 7] == 84 - 13
    state = {k: torch.randn(v) if "index" not in k else index for k, v in expected.items()}
    model.load_state_dict(state, strict=True)


def test_outputs_are_maps_at_the_nominal_strides():
    cfg = swin_cfg("MODEL.SWIN.EMBED_DIM", 16, "MODEL.SWIN.DEPTHS", [2, 2, 2, 2], "MODEL.SWIN.NUM_HEADS", [1, 2, 2, 4],
                   "MODEL.SWIN.WINDOW_SIZE", 4, "MODEL.SWIN.DROP_PATH_RATE", 0.0)
    model = D2SwinTransformer(cfg, ShapeSpec(channels=3)).eval()
    assert D2SwinTransformer.output_format == "maps" and model.size_divisibility == 32
    x = torch.randn(2, 3, 72, 100, requires_grad=True)  # not a multiple of the windows: padded inside
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 16, 18, 25), "res3": (2, 32, 9, 13), "res4": (2, 64, 5, 7), "res5": (2, 128, 3, 4)}
    assert {k: (s.channels, s.stride) for k, s in model.output_shape().items()} == {
        "res2": (16, 4), "res3": (32, 8), "res4": (64, 16), "res5": (128, 32)}
    out["res5"].sum().backward()
    assert x.grad.abs().sum() > 0
    # images are independent of each other in the batch
    torch.testing.assert_close(model(x[1:].detach())["res3"], out["res3"][1:].detach(), atol=1e-5, rtol=1e-5)


def test_shifted_window_mask_blocks_wrapped_regions():
    layer = BasicLayer(dim=4, depth=2, num_heads=1, window_size=4, drop_path=[0.0, 0.0])
    mask = layer.shifted_window_mask(8, 8, torch.device("cpu"))  # 2 x 2 windows of 4 x 4, shift 2
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    # bottom-right window: four regions of 2 x 2; positions 0 and 3 (same row, across the
    # column boundary) are blocked, 0 and 1 are not
    assert mask[3, 0, 1] == 0 and mask[3, 0, 3] == -100 and mask[3, 0, 8] == -100


def test_unknown_out_feature_is_refused():
    with pytest.raises(ValueError, match="MODEL.SWIN.OUT_FEATURES"):
        D2SwinTransformer(swin_cfg("MODEL.SWIN.OUT_FEATURES", ["res6"]), ShapeSpec(channels=3))
