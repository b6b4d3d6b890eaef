"""Focal Transformer: sizes, state_dict layout, the gathered focal attention against a direct
reference written from the attention's definition, variable input sizes, precisions."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import aff_seg  # noqa: F401
from aff_seg.modeling.backbone.focal import FocalTransformer, FocalTransformerBlock, focal_key_index, ring_offsets

SIZES = {  # the published models (Focal-Transformer README)
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
# (classification model with final norm + 1000-way head, backbone with norm0..3), README / derived
PARAMS = {
    ("tiny", False): (28_880_380, 28_112_724),
    ("tiny", True): (30_825_244, 30_057_588),
    ("small", False): (51_141_940, 50_374_284),
    ("small", True): (53_086_804, 52_319_148),
    ("base", False): (89_815_400, 88_792_192),
    ("base", True): (93_268_712, 92_245_504),
}


def meta_model(size, conv=False, **kwargs):
    with torch.device("meta"):
        return FocalTransformer(**SIZES[size], use_conv_embed=conv, **kwargs)


@pytest.mark.parametrize("size,conv", list(PARAMS))
def test_parameter_counts(size, conv):
    model = meta_model(size, conv)
    backbone = sum(p.numel() for p in model.parameters())
    c = model.num_features[-1]
    output_norms = sum(p.numel() for name, p in model.named_parameters() if name.startswith("norm"))
    classification = backbone - output_norms + 2 * c + (c * 1000 + 1000)
    assert (classification, backbone) == PARAMS[(size, conv)]


def expected_state_dict(size, conv=False):
    """Keys and shapes of an official classification checkpoint (without ``norm.*``/``head.*``)
    plus the output norms, written out from the checkpoint's layout."""
    cfg = SIZES[size]
    c0, patch = cfg["embed_dim"], (7 if conv else 4)
    out = {"patch_embed.proj.weight": (c0, 3, patch, patch), "patch_embed.proj.bias": (c0,),
           "patch_embed.norm.weight": (c0,), "patch_embed.norm.bias": (c0,)}
    for i, (depth, heads, kf) in enumerate(zip(cfg["depths"], cfg["num_heads"], (7, 5, 3, 1))):
        c = c0 * 2 ** i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            out.update({p + "pool_layers.0.weight": (1, 49), p + "pool_layers.0.bias": (1,)})
            for norm in ("norm1", "norm2"):
                out.update({f"{p}{norm}.weight": (c,), f"{p}{norm}.bias": (c,)})
            a = p + "attn."
            out.update({
                a + "relative_position_bias_table": (169, heads), a + "relative_position_index": (49, 49),
                a + "relative_position_index_0": (49, kf * kf),
                a + "relative_position_bias_table_to_windows.0": (heads, (6 + kf) ** 2),
                a + "qkv.weight": (3 * c, c), a + "qkv.bias": (3 * c,), a + "proj.weight": (c, c), a + "proj.bias": (c,),
                p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,),
            })
            if i < 3:  # the last stage's map at 224 is one window: no ring
                out.update({a + "relative_position_bias_table_to_neighbors": (1, heads, 49, 132),
                            a + "valid_ind_rolled": (132,)})
        if i < 3:
            k = 3 if conv else 2
            out.update({f"layers.{i}.downsample.proj.weight": (2 * c, c, k, k), f"layers.{i}.downsample.proj.bias": (2 * c,),
                        f"layers.{i}.downsample.norm.weight": (2 * c,), f"layers.{i}.downsample.norm.bias": (2 * c,)})
        out.update({f"norm{i}.weight": (c,), f"norm{i}.bias": (c,)})
    return out


@pytest.mark.parametrize("size,conv", [("tiny", False), ("tiny", True), ("small", False), ("base", False)])
def test_state_dict_matches_the_official_layout(size, conv):
    state = {k: tuple(v.shape) for k, v in meta_model(size, conv).state_dict().items()}
    assert state == expected_state_dict(size, conv)
    # 256 (T) / 496 (S, B) entries in the classification checkpoint: - norm/head (4) + norm0..3 (8)
    assert len(state) == {"tiny": 260, "small": 500, "base": 500}[size]


def test_index_buffers_have_the_official_values():
    attn = FocalTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)).layers[0].blocks[0].attn
    # Swin-style own-window index: (dy + 6) * 13 + (dx + 6)
    assert attn.relative_position_index[0, 0] == 84 and attn.relative_position_index[0, 48] == 0
    assert attn.relative_position_index[48, 0] == 168
    # query (0, 0) against pooled window (6, 6) of the 7x7 neighbourhood: (0 - 6 + 6) * 13 + 0
    assert attn.relative_position_index_0[0, 48] == 0 and attn.relative_position_index_0[48, 0] == 168
    keep = attn.valid_ind_rolled.tolist()
    assert len(keep) == 132 and keep[:4] == [4, 5, 6, 11] and keep[33] == 49 and keep[-1] == 3 * 49 + 6 * 7 + 2


def test_ring_has_the_twelve_duplicates_and_wraps_around():
    offsets = [tuple(o) for o in ring_offsets(7, 3)[1].tolist()]
    counts = {o: offsets.count(o) for o in offsets}
    duplicated = sorted(o for o, n in counts.items() if n == 2)
    assert len(offsets) == 132 and len(counts) == 120 and max(counts.values()) == 2
    assert duplicated == sorted([(-3, 3), (-2, 3), (-1, 3), (3, -3), (3, -2), (3, -1),
                                 (3, 7), (3, 8), (3, 9), (7, 3), (8, 3), (9, 3)])
    index, mask = focal_key_index(7, 3, 5, 14, 21, torch.device("cpu"))
    assert index.shape == (6, 49 + 132 + 25) and mask.shape == index.shape
    ring = index[0, 49:181]
    rows, cols = ring // 21, ring % 21
    assert (rows >= 11).any() and (cols >= 18).any()  # the top-left window sees the bottom and right edges
    assert (mask[:, :181] == 0).all() and mask[0, 181:].eq(-100).sum() == 25 - 6  # the whole 2x3 grid is in reach


def reference_block(block, x):
    """The block written directly from the definition of focal self-attention (torch.roll for the
    ring, an explicit loop over the pooled neighbourhood, per-pair loops for the biases)."""
    attn = block.attn
    w, e, kf, heads = attn.window_size, attn.expand_size, attn.focal_window, attn.num_heads
    b, height, width, c = x.shape
    d = c // heads
    xn = F.pad(block.norm1(x), (0, 0, 0, -width % w, 0, -height % w))  # padded tokens are exact zeros
    hp, wp = xn.shape[1:3]
    nwh, nww = hp // w, wp // w
    q, k, v = attn.qkv(xn).split(c, dim=-1)

    def windows(t):  # b x H x W x C -> b x nW x w*w x C
        return t.reshape(b, nwh, w, nww, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nwh * nww, w * w, c)

    keys, values, biases = [windows(k)], [windows(v)], []
    own_bias = torch.zeros(heads, w * w, w * w)
    for (qr, qc), (kr, kc) in itertools.product(itertools.product(range(w), repeat=2), repeat=2):
        own_bias[:, qr * w + qc, kr * w + kc] = attn.relative_position_bias_table[(qr - kr + w - 1) * (2 * w - 1) + qc - kc + w - 1]
    biases.append(own_bias)
    if e > 0:
        for sy, sx in ((e, e), (e, -e), (-e, e), (-e, -e)):
            keep = [r * w + cc for r in range(w) for cc in range(w)
                    if (r >= w - e if sy > 0 else r < e) or (cc >= w - e if sx > 0 else cc < e)]
            # the token at (i + sy, j + sx) (mod the padded map) lands at (i, j)
            keys.append(windows(torch.roll(k, shifts=(-sy, -sx), dims=(1, 2)))[:, :, keep])
            values.append(windows(torch.roll(v, shifts=(-sy, -sx), dims=(1, 2)))[:, :, keep])
        biases.append(attn.relative_position_bias_table_to_neighbors[0])
    mask = torch.zeros(nwh * nww, 0)
    if kf > 0:
        pooled = block.pool_layers[0](windows(xn).transpose(2, 3)).squeeze(-1)  # b x nW x C: Linear(w*w, 1)
        _, pk, pv = attn.qkv(pooled).split(c, dim=-1)
        pk, pv = pk.reshape(b, nwh, nww, c), pv.reshape(b, nwh, nww, c)
        nk, nv, nm = [], [], []
        for wy, wx in itertools.product(range(nwh), range(nww)):
            ks, vs, ms = [], [], []
            for a, bb in itertools.product(range(kf), repeat=2):
                y, xx = wy + a - kf // 2, wx + bb - kf // 2
                inside = 0 <= y < nwh and 0 <= xx < nww
                ks.append(pk[:, y, xx] if inside else torch.zeros(b, c))
                vs.append(pv[:, y, xx] if inside else torch.zeros(b, c))
                ms.append(0.0 if inside else -100.0)
            nk.append(torch.stack(ks, 1))
            nv.append(torch.stack(vs, 1))
            nm.append(ms)
        keys.append(torch.stack(nk, 1))
        values.append(torch.stack(nv, 1))
        mask = torch.tensor(nm)
        pool_bias = torch.zeros(heads, w * w, kf * kf)
        for (qr, qc), (a, bb) in itertools.product(itertools.product(range(w), repeat=2), itertools.product(range(kf), repeat=2)):
            table = attn.relative_position_bias_table_to_windows[0]
            pool_bias[:, qr * w + qc, a * kf + bb] = table[:, (qr - a + kf - 1) * (w + kf - 1) + qc - bb + kf - 1]
        biases.append(pool_bias)
    key, value = torch.cat(keys, 2), torch.cat(values, 2)  # b x nW x N x C
    n = key.shape[2]
    split = lambda t, m: t.reshape(b, nwh * nww, m, heads, d).transpose(2, 3)  # noqa: E731
    logits = (split(windows(q), w * w) * attn.scale) @ split(key, n).transpose(-1, -2)
    mask = torch.cat([torch.zeros(nwh * nww, n - mask.shape[1]), mask], 1)
    logits = logits + torch.cat(biases, -1) + mask[None, :, None, None, :]
    out = (logits.softmax(-1) @ split(value, n)).transpose(2, 3).reshape(b, nwh * nww, w * w, c)
    out = attn.proj(out).reshape(b, nwh, nww, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    x = x + out[:, :height, :width]
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("focal_window", [7, 5, 3, 1])
@pytest.mark.parametrize("height,width,expand", [(9, 12, 3), (16, 23, 3), (10, 8, 0)])
def test_gathered_attention_equals_the_reference(focal_window, height, width, expand):
    torch.manual_seed(focal_window)
    block = FocalTransformerBlock(8, 2, window_size=7, expand_size=expand, focal_window=focal_window).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)  # every bias table and the pooling matter
        x = torch.randn(2, height, width, 8)
        torch.testing.assert_close(block(x), reference_block(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "max", "conv", "none"])
def test_other_pool_methods_run(pool):
    block = FocalTransformerBlock(8, 2, window_size=7, expand_size=3, focal_window=3, pool_method=pool)
    out = block(torch.randn(1, 9, 12, 8))
    out.sum().backward()
    assert out.shape == (1, 9, 12, 8) and block.attn.qkv.weight.grad.abs().sum() > 0
    assert len(block.pool_layers) == (pool in ("fc", "conv"))
    assert hasattr(block.attn, "relative_position_bias_table_to_windows") == (pool != "none")


def tiny_focal(**kwargs):
    torch.manual_seed(0)
    return FocalTransformer(**{"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), **kwargs}).eval()


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("height,width", [(512, 683), (250, 330), (32, 32)])
def test_any_input_size(conv, height, width):
    model = tiny_focal(use_conv_embed=conv)
    with torch.no_grad():
        out = model(torch.randn(1, 3, height, width))
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        stride = 4 * 2 ** i
        assert out[name].shape == (1, 16 * 2 ** i, -(-height // stride), -(-width // stride)), name
        assert torch.isfinite(out[name]).all()


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.08), (torch.float16, 0.015)])
def test_autocast_matches_float32(dtype, atol):
    model = tiny_focal()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)
    for name in ref:
        torch.testing.assert_close(low[name].float(), ref[name], atol=atol, rtol=0)


def test_training_step_and_checkpointing_match():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_focal(use_checkpoint=use_checkpoint).train()
        sum(o.square().mean() for o in model(x).values()).backward()
        grads.append(model.layers[0].blocks[0].attn.relative_position_bias_table_to_neighbors.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(focal_levels=(3, 2, 2, 2)), "FOCAL_LEVELS"),
    (dict(focal_windows=(7, 4, 3, 1)), "FOCAL_WINDOWS"),
    (dict(focal_pool="avg"), "FOCAL_POOL"),
    (dict(num_heads=(3, 2, 2, 4)), "NUM_HEADS"),
])
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_focal(**kwargs)
