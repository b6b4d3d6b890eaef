"""Mix Transformer (MiT), the SegFormer encoder (Xie et al., "SegFormer: Simple and Efficient Design
for Semantic Segmentation with Transformers", NeurIPS 2021), and its detectron2 backbone
``D2MixVisionTransformer`` (``cfg.MODEL.MIT.*``).

Each of the four stages is an overlapping patch embedding (strided conv + LayerNorm), blocks of
efficient self-attention (keys/values from a map reduced ``sr_ratio`` times by a strided conv)
and Mix-FFN (a 3x3 depthwise conv between the two linears), then a LayerNorm. The module names
are those of the NVlabs/SegFormer checkpoints (``patch_embed1``, ``block1.0.attn.kv``, ``norm1``
...), so their ``backbone.*`` tensors load by name; ``aff_seg.modeling.backbone.segformer_weights``
maps the HuggingFace names.
"""
import math

import torch
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from .attention import DropPath
from .base import EncoderMapsBackbone

__all__ = ["MIT_SIZES", "MixVisionTransformer", "D2MixVisionTransformer", "maps_to_tokens", "tokens_to_maps"]

# the published sizes: stage widths and depths (heads 1/2/5/8, SR ratios 8/4/2/1 for all)
MIT_SIZES = {
    "b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2)},
    "b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3)},
    "b3": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 18, 3)},
    "b4": {"embed_dims": (64, 128, 320, 512), "depths": (3, 8, 27, 3)},
    "b5": {"embed_dims": (64, 128, 320, 512), "depths": (3, 6, 40, 3)},
}


def maps_to_tokens(x):
    """``b x c x h x w`` -> ``b x (h w) x c``."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_maps(x, height, width):
    """``b x (h w) x c`` -> ``b x c x h x w``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


class OverlapPatchEmbed(nn.Module):
    """Conv(k=patch, s=stride, pad=patch//2) then LayerNorm: ``b x c x h x w -> b x n x C, h', w'``."""

    def __init__(self, in_chans, embed_dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(maps_to_tokens(x)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map reduced by ``sr_ratio``.

    ``kv`` is one Linear(C, 2C): rows ``0..C-1`` make the keys, ``C..2C-1`` the values.
    """

    def __init__(self, dim, num_heads, sr_ratio, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MODEL.MIT: {num_heads} heads do not divide the stage width {dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, height, width):
        """``x``: b x n x C (n = h w) -> b x n x C."""
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(maps_to_tokens(self.sr(tokens_to_maps(x, height, width))))
        k, v = self.kv(x).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3x3 depthwise conv applied to tokens laid out as a map."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, height, width):
        return maps_to_tokens(self.dwconv(tokens_to_maps(x, height, width)))


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2, on ``b x n x C`` tokens."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x, height, width):
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class MiTBlock(nn.Module):
    """Pre-norm block: ``x += DropPath(Attn(LN1 x)); x += DropPath(MixFFN(LN2 x))``."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, qkv_bias=True, drop_path=0.0, ln_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x, height, width):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixVisionTransformer(nn.Module):
    """The MiT encoder: ``b x 3 x H x W`` -> four maps ``b x C_i x H_i x W_i``, ``H_i = ceil(H / 4 / 2**i)``
    (for the default patch sizes and strides).

    LayerNorm eps: ``ln_eps`` for the block and stage norms (NVlabs 1e-6, HuggingFace 1e-5),
    1e-5 for the patch-embedding and reduction norms (both originals).
    """

    def __init__(self, in_chans=3, embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8),
                 sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4), patch_sizes=(7, 3, 3, 3), strides=(4, 2, 2, 2),
                 qkv_bias=True, drop_path_rate=0.1, ln_eps=1e-6, out_indices=(0, 1, 2, 3)):
        super().__init__()
        lengths = {len(v) for v in (embed_dims, depths, num_heads, sr_ratios, mlp_ratios, patch_sizes, strides)}
        if lengths != {4}:
            raise ValueError("MODEL.MIT: EMBED_DIMS, DEPTHS, NUM_HEADS, SR_RATIOS, MLP_RATIOS, PATCH_SIZES and "
                             "STRIDES need one value per stage (4)")
        self.embed_dims = list(embed_dims)
        self.out_indices = list(out_indices)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        for i in range(4):
            dim = embed_dims[i]
            stage_rates, rates = rates[: depths[i]], rates[depths[i]:]
            setattr(self, f"patch_embed{i + 1}",
                    OverlapPatchEmbed(in_chans if i == 0 else embed_dims[i - 1], dim, patch_sizes[i], strides[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                MiTBlock(dim, num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias, rate, ln_eps) for rate in stage_rates
            ))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=ln_eps))
        self.apply(_init_weights)

    def forward(self, x):
        """``x``: b x 3 x H x W -> list of the ``out_indices`` stage maps."""
        outs = []
        for i in range(4):
            x, height, width = getattr(self, f"patch_embed{i + 1}")(x)
            for block in getattr(self, f"block{i + 1}"):
                x = block(x, height, width)
            x = tokens_to_maps(getattr(self, f"norm{i + 1}")(x), height, width)
            if i in self.out_indices:
                outs.append(x)
        return outs


def _init_weights(module):
    """The NVlabs initialisation: trunc-normal(0.02) linears, fan-out normal convs, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@BACKBONE_REGISTRY.register()
class D2MixVisionTransformer(EncoderMapsBackbone, MixVisionTransformer):
    """MiT as a detectron2 backbone (``cfg.MODEL.MIT.*``); see ``DenseMapsBackbone`` for the outputs."""

    encoder_class = MixVisionTransformer
    config_node = "MIT"
