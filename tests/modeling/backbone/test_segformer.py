"""SegFormer (MiT + all-MLP head) and BoostFormer: sizes, shapes, block formulas, a CPU training step."""
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import aff_seg  # noqa: F401
from aff_seg.evaluation import SlidingWindowInference
from aff_seg.modeling.backbone import MIT_SIZES, BoostFormer, MixVisionTransformer
from aff_seg.modeling.backbone.boostformer import MixConv, PooledKVAttention, PoolBlock
from aff_seg.modeling.backbone.mit import EfficientSelfAttention
from aff_seg.modeling.meta_arch import BoostFormerHead
from detectron2.modeling import ShapeSpec, build_model

from .segformer_helpers import TINY_BOOSTFORMER, TINY_MIT, semantic_cfg

# the published counts (ADE20K, 150 classes); BoostFormer without the original's unused linear_fuse
PARAMETERS = {"b0": 3_752_694, "b1": 13_715_798, "b2": 27_461_974, "b3": 47_337_814, "b4": 64_108_374,
              "b5": 84_708_694}
ENCODER_PARAMETERS = {"b0": 3_319_392, "b1": 13_151_424, "b2": 24_196_288, "b3": 44_072_128, "b4": 60_842_688,
                      "b5": 81_443_008}


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", sorted(PARAMETERS))
def test_segformer_parameter_counts(size):
    with torch.device("meta"):
        model = build_model(semantic_cfg("mit", size, device="meta"))
    assert (count(model), count(model.backbone)) == (PARAMETERS[size], ENCODER_PARAMETERS[size])


def test_boostformer_parameter_counts():
    with torch.device("meta"):
        model = build_model(semantic_cfg("boostformer", device="meta"))
    assert count(model.backbone) == 16_670_208
    assert count(model) == 17_576_602
    # Cityscapes (19 classes): only the classifier changes
    with torch.device("meta"):
        city = build_model(semantic_cfg("boostformer", num_classes=19, device="meta"))
    assert count(model) - count(city) == (150 - 19) * 769


@pytest.mark.parametrize("family", ["mit", "boostformer"])
@pytest.mark.parametrize("size", [(512, 512), (512, 683)])
def test_output_shapes(family, size):
    with torch.device("meta"):
        encoder = MixVisionTransformer(**MIT_SIZES["b2"]) if family == "mit" else BoostFormer()
    outs = encoder(torch.empty(1, 3, *size, device="meta"))
    sides = [size]
    for _ in range(4):
        sides.append(tuple(math.ceil(s / (4 if len(sides) == 1 else 2)) for s in sides[-1]))
    assert [tuple(o.shape) for o in outs] == [(1, c) + hw for c, hw in zip((64, 128, 320, 512), sides[1:])]
    if size == (512, 683):
        assert sides[1:] == [(128, 171), (64, 86), (32, 43), (16, 22)]


@pytest.mark.parametrize("family", ["mit", "boostformer"])
def test_semantic_model_inference_is_at_the_requested_size(family):
    torch.manual_seed(0)
    encoder = TINY_MIT if family == "mit" else TINY_BOOSTFORMER
    model = build_model(semantic_cfg(family, num_classes=5, embed_dim=16, encoder=encoder)).eval()
    assert model.backbone.output_format == "maps" and model.backbone.size_divisibility == 32
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 70, 90) * 255, "height": 35, "width": 45}])
    assert out[0]["sem_seg"].shape == (5, 35, 45)


def test_mixconv_splits_channels_first_half_3x3_second_half_5x5():
    mix = MixConv(4)
    with torch.no_grad():
        mix.conv_3.weight.fill_(1.0)
        mix.conv_5.weight.fill_(2.0)
        mix.conv_3.bias.zero_()
        mix.conv_5.bias.zero_()
    out = mix(torch.ones(1, 4, 5, 5))
    # centre: a full 3x3 window (9) / a full 5x5 window times 2 (50); corner: 2x2 (4) / 3x3 times 2 (18)
    assert out[0, :, 2, 2].tolist() == [9.0, 9.0, 50.0, 50.0]
    assert out[0, :, 0, 0].tolist() == [4.0, 4.0, 18.0, 18.0]


def test_pool_block_token_mixer_by_hand():
    block = PoolBlock(1, layer_scale_init=0.5, norm="BN").eval()
    with torch.no_grad():
        block.mlp.conv2.weight.zero_()
        block.mlp.conv2.bias.zero_()  # MLP branch off: out = BN2(x + 0.5 (AvgPool(x) - x)), BN2 = identity
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    # 3x3 means over the pixels inside the image: corners 4 cells, edges 6, centre 9
    means = torch.tensor([[3.0, 3.5, 4.0], [4.5, 5.0, 5.5], [6.0, 6.5, 7.0]])
    expected = x[0, 0] + 0.5 * (means - x[0, 0])
    assert torch.allclose(block(x)[0, 0], expected / math.sqrt(1 + 1e-5), atol=1e-6)


def test_pool_block_mlp_branch_is_post_norm():
    torch.manual_seed(0)
    block = PoolBlock(2, layer_scale_init=0.3, norm="BN").eval()
    for bn in (block.norm_1, block.norm_2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 2, 4, 5)
    h = x + 0.3 * (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x)
    expected = block.norm_2(h + 0.3 * block.mlp(block.norm_1(h)))
    assert torch.allclose(block(x), expected, atol=1e-6)


@pytest.mark.parametrize("length", [4, 16, 32])
def test_adaptive_pool_bins(length):
    attention = PooledKVAttention(1, 1, pool_size=7)
    line = torch.arange(float(length)).reshape(1, 1, 1, length).expand(1, 1, length, length)
    pooled = attention.pool(line)[0, 0, 0]
    bins = [(math.floor(i * length / 7), math.ceil((i + 1) * length / 7)) for i in range(7)]
    assert pooled.tolist() == pytest.approx([sum(range(a, b)) / (b - a) for a, b in bins])
    if length == 4:  # bins overlap and repeat cells
        assert pooled.tolist() == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5, 3])


def test_pooled_kv_attention_by_hand():
    torch.manual_seed(0)
    attention = PooledKVAttention(4, 2, pool_size=2)
    x = torch.randn(1, 3 * 4, 4)  # a 3 x 4 map of 4 channels
    out = attention(x, 3, 4)
    grid = x.transpose(1, 2).reshape(1, 4, 3, 4)
    # adaptive 2x2 bins of a 3x4 map: rows [0,2) and [1,3), columns [0,2) and [2,4)
    cells = [grid[0, :, r0:r1, c0:c1].mean(dim=(1, 2)) for r0, r1 in ((0, 2), (1, 3)) for c0, c1 in ((0, 2), (2, 4))]
    z = F.gelu(F.layer_norm(torch.stack(cells), (4,), attention.norm.weight, attention.norm.bias))
    q, k, v = attention.query(x[0]), attention.key(z), attention.value(z)
    heads = []
    for h in range(2):
        s = slice(2 * h, 2 * h + 2)
        heads.append(torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(2), dim=-1) @ v[:, s])
    assert torch.allclose(out[0], torch.cat(heads, dim=1), atol=1e-5)  # no output projection


def test_mit_attention_kv_rows_are_keys_then_values():
    torch.manual_seed(0)
    attention = EfficientSelfAttention(4, 1, sr_ratio=2)
    x = torch.randn(1, 16, 4)
    reduced = attention.norm(attention.sr(x.transpose(1, 2).reshape(1, 4, 4, 4)).flatten(2).transpose(1, 2))
    kv = attention.kv(reduced)[0]
    k, v = kv[:, :4], kv[:, 4:]
    expected = attention.proj(torch.softmax(attention.q(x[0]) @ k.T / 2.0, dim=-1) @ v)
    assert torch.allclose(attention(x, 4, 4)[0], expected, atol=1e-5)


def test_weighted_sum_head():
    shapes = {f"res{i + 2}": ShapeSpec(channels=c, stride=4 * 2**i) for i, c in enumerate((2, 3, 4, 5))}
    head = BoostFormerHead(shapes, num_classes=3, embed_dim=6, norm="BN", dropout=0.0)
    assert not hasattr(head, "linear_fuse")
    maps = [torch.randn(1, 6, 4, 4) for _ in range(4)]
    assert torch.allclose(head.fuse(maps), maps[0] + maps[1] + maps[2] + maps[3])  # w initialised to 1
    with torch.no_grad():
        head.weights.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    assert torch.allclose(head.fuse(maps), maps[0] + 2 * maps[1] + 3 * maps[2] + 4 * maps[3])


@pytest.mark.parametrize("family", ["mit", "boostformer"])
def test_cpu_training_step_with_batchnorm_in_train_mode(family):
    torch.manual_seed(0)
    encoder = TINY_MIT if family == "mit" else TINY_BOOSTFORMER
    model = build_model(semantic_cfg(family, num_classes=4, embed_dim=16, encoder=encoder)).train()
    batch = [{"image": torch.rand(3, 64, 64) * 255, "sem_seg": torch.randint(0, 4, (64, 64))} for _ in range(2)]
    batch[0]["sem_seg"][:8] = 255  # ignored
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.training for m in norms)
    before = [m.running_mean.clone() for m in norms]
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    losses["loss_sem_seg"].backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter is used (no DDP surprise)
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, norms))


@pytest.mark.parametrize("backbone", ["D2MixVisionTransformer", "D2BoostFormer"])
def test_backbones_feed_the_mask2former_heads(backbone):
    from aff_seg import add_maskformer2_config
    from detectron2.config import get_cfg
    from detectron2.structures import Instances

    cfg = add_maskformer2_config(get_cfg())
    cfg.merge_from_file(str(Path(__file__).resolve().parents[3] / "configs/synthetic/ade20k_semantic_grid.yaml"))
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", backbone, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
                         "MODEL.MASK_FORMER.DEC_LAYERS", "2"])
    for keys in (cfg.MODEL.MIT, cfg.MODEL.BOOSTFORMER):
        keys.EMBED_DIMS, keys.DEPTHS, keys.NUM_HEADS = [8, 16, 24, 32], [1, 1, 1, 1], [1, 2, 2, 4]
    cfg.MODEL.BOOSTFORMER.NORM = "BN"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    instances = Instances((64, 64), gt_classes=torch.tensor([1, 2]), gt_masks=torch.zeros(2, 64, 64, dtype=torch.bool))
    instances.gt_masks[0, :32] = True
    instances.gt_masks[1, 32:] = True
    losses = model([{"image": torch.rand(3, 64, 64) * 255, "instances": instances}])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.patch_embed1.proj.weight.grad is not None if backbone == "D2MixVisionTransformer" else \
        model.backbone.patch_embeddings[0].conv.weight.grad is not None
    image = [{"image": torch.rand(3, 70, 90) * 255}]
    with torch.no_grad():
        assert model.eval()(image)[0]["sem_seg"].shape == (150, 70, 90)
        # the Mask2Former semantic output through sliding windows
        assert SlidingWindowInference(model, (64, 64), (32, 32))(image)[0]["sem_seg"].shape == (150, 70, 90)
