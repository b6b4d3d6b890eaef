"""BoostFormer, a lightweight SegFormer-B2 derivative (boostcampaitech4lv23cv3/final-project-level3-cv-16),
and its detectron2 backbone ``D2BoostFormer`` (``cfg.MODEL.BOOSTFORMER.*``).

Differences from the MiT encoder (``mit.py``), as the original code computes them:

* patch embedding: AvgPool(k=patch, s=stride, pad=k//2, padding excluded from the mean) -> 1x1 conv
  -> LayerNorm, instead of a strided conv;
* "pool" stages: ``h = x + DropPath(g1 * (AvgPool3x3(x) - x))``,
  ``out = BN2(h + DropPath(g2 * MixCFN(BN1(h))))`` (PoolFormer-style mixer, post-norm BatchNorms);
* "attn" stages: ``h = x + DropPath(CSA(x))``, ``out = LN2(h + DropPath(MixCFN(LN1(h))))``; CSA takes its
  queries from ``x`` as it arrives (no norm) and its keys/values from
  ``GELU(LN(AdaptiveAvgPool_7x7(x)))`` (49 tokens at any resolution), without output projection;
* MixCFN: 1x1 conv (C -> 4C) -> BN -> depthwise 3x3 on the first half of the channels and 5x5 on the
  second -> BN -> GELU -> 1x1 conv (4C -> C);
* no stage LayerNorm: a stage's output is its last block's output.

Module names follow the HuggingFace ``save_pretrained`` dumps of the original (``patch_embeddings.0.conv``,
``block.2.0.attention.query`` ...); ``segformer_weights`` maps the few that differ.
"""
import torch
from detectron2.layers import get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from .attention import DropPath
from .base import EncoderMapsBackbone
from .mit import maps_to_tokens, tokens_to_maps

__all__ = ["BoostFormer", "D2BoostFormer"]

BLOCK_TYPES = ("pool", "attn")


class PoolPatchEmbed(nn.Module):
    """AvgPool(k, s, k//2, count_include_pad=False) -> 1x1 conv -> LayerNorm: ``b x c x h x w -> b x C x h' x w'``."""

    def __init__(self, in_chans, embed_dim, patch_size, stride):
        super().__init__()
        self.pool = nn.AvgPool2d(patch_size, stride, patch_size // 2, count_include_pad=False)
        self.conv = nn.Conv2d(in_chans, embed_dim, 1)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.conv(self.pool(x))
        return tokens_to_maps(self.layer_norm(maps_to_tokens(x)), *x.shape[-2:])


class MixConv(nn.Module):
    """Depthwise ``kernels[0]`` conv on the first ``E // 2`` channels, ``kernels[1]`` on the rest (same padding)."""

    def __init__(self, dim, kernels=(3, 5)):
        super().__init__()
        first = dim // 2
        # names of the original's dumps: conv_3 / conv_5 whatever the kernels
        self.conv_3 = nn.Conv2d(first, first, kernels[0], padding=kernels[0] // 2, groups=first)
        self.conv_5 = nn.Conv2d(dim - first, dim - first, kernels[1], padding=kernels[1] // 2, groups=dim - first)

    def forward(self, x):
        first, rest = x.split([self.conv_3.in_channels, self.conv_5.in_channels], dim=1)
        return torch.cat([self.conv_3(first), self.conv_5(rest)], dim=1)


class MixCFN(nn.Module):
    """1x1 conv -> norm -> MixConv -> norm -> GELU -> 1x1 conv on ``b x C x h x w`` maps."""

    def __init__(self, dim, hidden_dim, kernels=(3, 5), norm="BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1)
        self.norm_1 = get_norm(norm, hidden_dim)
        self.mixconv = MixConv(hidden_dim, kernels)
        self.norm_2 = get_norm(norm, hidden_dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        return self.conv2(self.act(self.norm_2(self.mixconv(self.norm_1(self.conv1(x))))))


class PoolBlock(nn.Module):
    """``h = x + DropPath(g1 (AvgPool(x) - x))``; ``out = BN2(h + DropPath(g2 MixCFN(BN1 h)))`` on maps."""

    def __init__(self, dim, mlp_ratio=4, pool_size=3, kernels=(3, 5), layer_scale_init=1e-5, drop_path=0.0,
                 norm="BN"):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.norm_1 = get_norm(norm, dim)
        self.norm_2 = get_norm(norm, dim)
        self.mlp = MixCFN(dim, int(dim * mlp_ratio), kernels, norm)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * (self.pool(x) - x))
        return self.norm_2(x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm_1(x))))


class PooledKVAttention(nn.Module):
    """Queries from every token; keys/values from ``GELU(LN(AdaptiveAvgPool(map)))`` (pool_size**2 tokens);
    no output projection. ``b x n x C -> b x n x C``."""

    def __init__(self, dim, num_heads, pool_size=7):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MODEL.BOOSTFORMER: {num_heads} heads do not divide the stage width {dim}")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward(self, x, height, width):
        b, n, c = x.shape
        heads = self.num_heads
        pooled = self.act(self.norm(maps_to_tokens(self.pool(tokens_to_maps(x, height, width)))))
        q = self.query(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        k = self.key(pooled).reshape(b, -1, heads, c // heads).transpose(1, 2)
        v = self.value(pooled).reshape(b, -1, heads, c // heads).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, c)


class AttentionBlock(nn.Module):
    """``h = x + DropPath(CSA(x))``; ``out = LN2(h + DropPath(MixCFN(LN1 h)))`` on ``b x C x h x w`` maps."""

    def __init__(self, dim, num_heads, mlp_ratio=4, kv_pool_size=7, kernels=(3, 5), drop_path=0.0, norm="BN"):
        super().__init__()
        self.attention = PooledKVAttention(dim, num_heads, kv_pool_size)
        self.layer_norm_1 = nn.LayerNorm(dim)
        self.layer_norm_2 = nn.LayerNorm(dim)
        self.mlp = MixCFN(dim, int(dim * mlp_ratio), kernels, norm)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        height, width = x.shape[-2:]
        tokens = maps_to_tokens(x)
        tokens = tokens + self.drop_path(self.attention(tokens, height, width))
        mixed = maps_to_tokens(self.mlp(tokens_to_maps(self.layer_norm_1(tokens), height, width)))
        return tokens_to_maps(self.layer_norm_2(tokens + self.drop_path(mixed)), height, width)


class BoostFormer(nn.Module):
    """The BoostFormer encoder: ``b x 3 x H x W`` -> four maps ``b x C_i x ceil(H / 4 / 2**i) x ...``."""

    def __init__(self, in_chans=3, embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8),
                 block_types=("pool", "pool", "attn", "attn"), mlp_ratios=(4, 4, 4, 4), patch_sizes=(7, 3, 3, 3),
                 strides=(4, 2, 2, 2), token_pool_size=3, kv_pool_size=7, mix_kernels=(3, 5), layer_scale_init=1e-5,
                 norm="BN", drop_path_rate=0.1, out_indices=(0, 1, 2, 3)):
        super().__init__()
        lengths = {len(v) for v in (embed_dims, depths, num_heads, block_types, mlp_ratios, patch_sizes, strides)}
        if lengths != {4}:
            raise ValueError("MODEL.BOOSTFORMER: EMBED_DIMS, DEPTHS, NUM_HEADS, BLOCK_TYPES, MLP_RATIOS, PATCH_SIZES "
                             "and STRIDES need one value per stage (4)")
        bad = [t for t in block_types if t not in BLOCK_TYPES]
        if bad:
            raise ValueError(f"MODEL.BOOSTFORMER.BLOCK_TYPES: {bad} not in {list(BLOCK_TYPES)}")
        if len(mix_kernels) != 2:
            raise ValueError(f"MODEL.BOOSTFORMER.MIX_KERNELS: two kernel sizes, got {list(mix_kernels)}")
        self.embed_dims = list(embed_dims)
        self.out_indices = list(out_indices)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.patch_embeddings = nn.ModuleList(
            PoolPatchEmbed(in_chans if i == 0 else embed_dims[i - 1], embed_dims[i], patch_sizes[i], strides[i])
            for i in range(4)
        )
        stages = []
        for i in range(4):
            stage_rates, rates = rates[: depths[i]], rates[depths[i]:]
            if block_types[i] == "pool":
                blocks = [PoolBlock(embed_dims[i], mlp_ratios[i], token_pool_size, mix_kernels, layer_scale_init,
                                    rate, norm) for rate in stage_rates]
            else:
                blocks = [AttentionBlock(embed_dims[i], num_heads[i], mlp_ratios[i], kv_pool_size, mix_kernels,
                                         rate, norm) for rate in stage_rates]
            stages.append(nn.ModuleList(blocks))
        self.block = nn.ModuleList(stages)
        self.apply(_init_weights)

    def forward(self, x):
        """``x``: b x 3 x H x W -> list of the ``out_indices`` stage maps."""
        outs = []
        for i, (embed, blocks) in enumerate(zip(self.patch_embeddings, self.block)):
            x = embed(x)
            for block in blocks:
                x = block(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def _init_weights(module):
    """The original's (HuggingFace) initialisation: normal(0.02) linears and convs, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@BACKBONE_REGISTRY.register()
class D2BoostFormer(EncoderMapsBackbone, BoostFormer):
    """BoostFormer as a detectron2 backbone (``cfg.MODEL.BOOSTFORMER.*``): ``{res2..res5}`` maps at strides
    4/8/16/32."""

    encoder_class = BoostFormer
    config_node = "BOOSTFORMER"
