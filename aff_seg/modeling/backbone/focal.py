"""Focal Transformer (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision
Transformers", NeurIPS 2021; classification code: microsoft/Focal-Transformer) as a dense backbone.

Focal self-attention, as the original computes it (``focal_levels=2``, no shift): the padded
feature map is cut into ``w x w`` windows; each window's queries attend to

1. fine keys: the window's own ``w*w`` tokens, then a ring of ``4 * (w*w - (w-e)**2)`` tokens
   around it (``e`` = expand size; 132 keys for w=7, e=3, of which 12 are duplicates, and the
   ring wraps cyclically around the padded map);
2. coarse keys: a ``kf x kf`` neighbourhood of pooled windows (one token per window), with
   out-of-grid neighbours as zero keys/values and a -100 logit bias.

Here the key set of every window is one precomputed index into a table of
``[padded tokens | pooled tokens | a zero token]``, so each block is one qkv projection, one
gather, and one attention call (``F.scaled_dot_product_attention``); the indices depend only on
the padded map size and are cached per (size, device). The checkpoint's state_dict keys,
shapes and persistent index buffers are the original's, so its classification weights load
unchanged (see ``focal_classification_state_dict``).

Any input size: the image is padded to a multiple of 4, odd maps before each 2x2 downsampler
to even, and each block pads its map to a multiple of the window (at least one window). Which
stages have the ring is decided once, from ``pretrain_img_size``: a stage whose map at that size
is no larger than the window (the last stage at 224) was trained without it, and keeps it off.
"""
from functools import lru_cache

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import DropPath, Mlp
from .base import OUT_FEATURES, DenseMapsBackbone, check_out_features
from .resnet_tokens import MapsAsTokens

__all__ = [
    "D2FocalTransformer",
    "D2FocalTransformerTokens",
    "FocalTransformer",
    "FocalAttention",
    "FocalTransformerBlock",
    "focal_key_index",
    "ring_offsets",
    "relative_position_index",
    "focal_classification_state_dict",
]

POOL_METHODS = ("none", "fc", "mean", "max", "conv")
MASK_VALUE = -100.0  # the original's logit bias on out-of-grid pooled windows


def ring_offsets(window_size, expand_size):
    """The ring keys of a window, in the original's order.

    Four groups, shifts (e, e), (e, -e), (-e, e), (-e, -e); in each, the window's ``w x w``
    positions (r, c) row-major, kept where the shifted position falls outside the window.

    Returns:
        ``(keep, offsets)``: ``keep`` (n,) int64, the kept positions as indices into the four
        groups' ``4 * w * w`` positions (the original's ``valid_ind_rolled`` buffer);
        ``offsets`` (n x 2) int64, each key's (dy, dx) from the window's top-left token.
    """
    w, e = window_size, expand_size
    r, c = torch.meshgrid(torch.arange(w, device="cpu"), torch.arange(w, device="cpu"), indexing="ij")
    r, c = r.flatten(), c.flatten()
    keep, offsets = [], []
    for group, (sy, sx) in enumerate(((e, e), (e, -e), (-e, e), (-e, -e))):
        outside_r = r >= w - e if sy > 0 else r < e
        outside_c = c >= w - e if sx > 0 else c < e
        kept = (outside_r | outside_c).nonzero().flatten()
        keep.append(kept + group * w * w)
        offsets.append(torch.stack([r[kept] + sy, c[kept] + sx], dim=1))
    return torch.cat(keep), torch.cat(offsets)


def relative_position_index(query_side, key_side):
    """``query_side**2 x key_side**2`` int64: for query (qr, qc) in a ``query_side`` square and key
    (kr, kc) in a ``key_side`` square, ``(qr-kr+key_side-1) * (query_side+key_side-1) + (qc-kc+key_side-1)``,
    the row of the relative position bias table ((query_side+key_side-1)**2 rows)."""
    q = torch.stack(torch.meshgrid(*[torch.arange(query_side, device="cpu")] * 2, indexing="ij")).flatten(1)
    k = torch.stack(torch.meshgrid(*[torch.arange(key_side, device="cpu")] * 2, indexing="ij")).flatten(1)
    rel = q[:, :, None] - k[:, None, :] + key_side - 1  # 2 x nq x nk
    return rel[0] * (query_side + key_side - 1) + rel[1]


@lru_cache(maxsize=256)
def focal_key_index(window_size, expand_size, focal_window, height, width, device):
    """Keys of every window of a padded ``height x width`` map, as indices into the key table
    ``[height*width map tokens (row-major) | nW pooled windows (row-major) | one zero token]``.

    Args:
        window_size: w (divides height and width). expand_size: e (0: no ring).
        focal_window: kf, the side of the pooled neighbourhood (0: no pooled keys).
        device: where the indices go (part of the cache key).
    Returns:
        ``(index, mask)``: ``index`` nW x N int64 with N = w*w + n_ring + kf*kf, per window
        (row-major): its own tokens (row-major), the ring (``ring_offsets`` order, cyclic
        wrap-around), the pooled neighbourhood (row-major, out-of-grid -> the zero token);
        ``mask`` nW x N float32, -100 on out-of-grid pooled keys and 0 elsewhere (None without
        pooled keys).
    """
    w = window_size
    nwh, nww = height // w, width // w
    window = torch.arange(nwh * nww)  # (row-major; no meshgrid of sizes that torch.export traces symbolically)
    wy, wx = window // nww, window % nww
    top, left = (wy.reshape(-1, 1) * w), (wx.reshape(-1, 1) * w)  # nW x 1
    r, c = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    columns = [(top + r.reshape(1, -1)) * width + left + c.reshape(1, -1)]
    if expand_size > 0:
        offsets = ring_offsets(w, expand_size)[1]
        columns.append(((top + offsets[:, 0]) % height) * width + (left + offsets[:, 1]) % width)
    mask = None
    if focal_window > 0:
        a, b = torch.meshgrid(torch.arange(focal_window), torch.arange(focal_window), indexing="ij")
        py = wy.reshape(-1, 1) + a.reshape(1, -1) - focal_window // 2
        px = wx.reshape(-1, 1) + b.reshape(1, -1) - focal_window // 2
        valid = (py >= 0) & (py < nwh) & (px >= 0) & (px < nww)
        zero_token = height * width + nwh * nww
        columns.append(torch.where(valid, height * width + py * nww + px, zero_token))
        mask = torch.zeros(nwh * nww, sum(col.shape[1] for col in columns))
        mask[:, -focal_window * focal_window:] = torch.where(valid, 0.0, MASK_VALUE)
        mask = mask.to(device)
    return torch.cat(columns, dim=1).to(device), mask


def window_partition(x, w):
    """``b x H x W x C`` (H, W multiples of w) -> ``b x nW x w*w x C``, windows and tokens row-major."""
    b, h, wd, c = x.shape
    x = x.reshape(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // w) * (wd // w), w * w, c)


def window_reverse(windows, w, h, wd):
    """Inverse of ``window_partition``: ``b x nW x w*w x C`` -> ``b x h x wd x C``."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.reshape(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


class FocalAttention(nn.Module):
    """Focal self-attention of one block (the original's ``WindowAttention``, same parameter names).

    Args:
        dim, num_heads: channels C and heads h (d = C / h).
        window_size: w. expand_size: e of the ring (0: none). focal_window: kf (0: no pooled keys).
        qkv_bias, qk_scale (falsy: d^-0.5), attn_drop, proj_drop: as in the original.
    """

    def __init__(self, dim, num_heads, window_size=7, expand_size=3, focal_window=7, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.window_size, self.expand_size, self.focal_window = window_size, expand_size, focal_window
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        area = window_size * window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size, window_size))
        if expand_size > 0:
            keep = ring_offsets(window_size, expand_size)[0]
            self.relative_position_bias_table_to_neighbors = nn.Parameter(torch.zeros(1, num_heads, area, len(keep)))
            nn.init.trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
            self.register_buffer("valid_ind_rolled", keep)
        if focal_window > 0:
            table = nn.Parameter(torch.zeros(num_heads, (window_size + focal_window - 1) ** 2))
            nn.init.trunc_normal_(table, std=0.02)
            self.relative_position_bias_table_to_windows = nn.ParameterList([table])
            self.register_buffer("relative_position_index_0", relative_position_index(window_size, focal_window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self):
        """``h x w*w x N``: the bias of every (query, key) pair, keys in ``focal_key_index`` order."""
        area, h = self.window_size ** 2, self.num_heads
        own = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        parts = [own.reshape(area, area, h).permute(2, 0, 1)]
        if self.expand_size > 0:
            parts.append(self.relative_position_bias_table_to_neighbors[0])
        if self.focal_window > 0:
            table = self.relative_position_bias_table_to_windows[0]
            parts.append(table[:, self.relative_position_index_0.reshape(-1)].reshape(h, area, -1))
        return torch.cat(parts, dim=-1)

    def forward(self, x, pooled=None):
        """x: ``b x Hp x Wp x C`` (Hp, Wp multiples of w); pooled: ``b x Hp/w x Wp/w x C`` (the
        pooled windows; required iff focal_window > 0) -> ``b x Hp x Wp x C``."""
        b, hp, wp, c = x.shape
        w, h = self.window_size, self.num_heads
        tokens = x.reshape(b, hp * wp, c)
        if self.focal_window > 0:
            tokens = torch.cat([tokens, pooled.reshape(b, -1, c)], dim=1)
        qkv = self.qkv(tokens)
        q = window_partition(qkv[:, : hp * wp, :c].reshape(b, hp, wp, c), w)  # b x nW x w*w x C
        kv = qkv[:, :, c:]
        if self.focal_window > 0:
            kv = torch.cat([kv, kv.new_zeros(b, 1, 2 * c)], dim=1)
        # sizes traced symbolically (torch.export) cannot key the cache: the graph builds the index
        key_index = focal_key_index.__wrapped__ if isinstance(hp * wp, torch.SymInt) else focal_key_index
        index, mask = key_index(w, self.expand_size, self.focal_window, hp, wp, x.device)
        nw, n = index.shape
        k, v = kv[:, index].reshape(b, nw, n, 2, h, c // h).permute(3, 0, 1, 4, 2, 5).reshape(2, b, nw * h, n, c // h)
        q = q.reshape(b, nw, w * w, h, c // h).transpose(2, 3).reshape(b, nw * h, w * w, c // h)
        bias = self.position_bias().unsqueeze(0)  # 1 x h x w*w x N
        if mask is not None:
            bias = bias + mask[:, None, None, :]
        bias = bias.expand(nw, h, w * w, n).reshape(1, nw * h, w * w, n).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        out = out.reshape(b, nw, h, w * w, c // h).transpose(2, 3).reshape(b, nw, w * w, c)
        return window_reverse(self.proj_drop(self.proj(out)), w, hp, wp)

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"expand_size={self.expand_size}, focal_window={self.focal_window}")


class FocalTransformerBlock(nn.Module):
    """Pre-norm block: ``x += DropPath(g1 * FocalAttn(LN1 x)); x += DropPath(g2 * MLP(LN2 x))``.

    Args:
        pool_method: how a window becomes one coarse token: "fc" (a learnt Linear(w*w, 1) over
            the window's positions, shared by the channels), "mean", "max", "conv" (depthwise
            w x w, stride w), or "none" (no coarse keys). focal_level: 2 (fine + coarse keys),
            1 (fine only) or 0 (own window only). Others as ``FocalAttention``.
    """

    def __init__(self, dim, num_heads, window_size=7, expand_size=3, focal_window=7, focal_level=2, pool_method="fc",
                 mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 use_layerscale=False, layerscale_value=1e-4):
        super().__init__()
        self.window_size = window_size
        self.pool_method = pool_method if focal_level > 1 else "none"
        self.pool_layers = nn.ModuleList()
        if self.pool_method == "fc":
            self.pool_layers.append(nn.Linear(window_size * window_size, 1))
        elif self.pool_method == "conv":
            self.pool_layers.append(nn.Conv2d(dim, dim, window_size, stride=window_size, groups=dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FocalAttention(
            dim, num_heads, window_size, expand_size if focal_level > 0 else 0,
            2 * (focal_window // 2) + 1 if self.pool_method != "none" else 0,
            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def pool(self, x):
        """``b x Hp x Wp x C`` -> ``b x Hp/w x Wp/w x C``, one token per window."""
        w = self.window_size
        if self.pool_method == "conv":
            return self.pool_layers[0](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        b, hp, wp, c = x.shape
        windows = x.reshape(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 5, 2, 4).reshape(b, hp // w, wp // w, c, w * w)
        if self.pool_method == "fc":
            return self.pool_layers[0](windows).squeeze(-1)
        return windows.mean(-1) if self.pool_method == "mean" else windows.amax(-1)

    def forward(self, x):
        """x: ``b x H x W x C`` -> ``b x H x W x C``."""
        height, width = x.shape[1:3]
        w = self.window_size
        attn_in = F.pad(self.norm1(x), (0, 0, 0, -width % w, 0, -height % w))
        pooled = self.pool(attn_in) if self.pool_method != "none" else None
        attn = self.attn(attn_in, pooled)[:, :height, :width]
        if self.gamma_1 is not None:
            attn = self.gamma_1 * attn
        x = x + self.drop_path(attn)
        mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            mlp = self.gamma_2 * mlp
        return x + self.drop_path(mlp)


class PatchEmbed(nn.Module):
    """Strided convolution + LayerNorm: the stem (4x4 stride 4, or 7x7 stride 4 padding 2 with
    ``use_conv_embed``) and the downsamplers (2x2 stride 2, or 3x3 stride 2 padding 1).

    The stem pads the image to a multiple of 4 and a plain downsampler pads odd maps to even,
    so the output is ``ceil(H / stride) x ceil(W / stride)`` either way.
    """

    def __init__(self, in_chans, embed_dim, is_stem, use_conv_embed=False, patch_norm=True, use_pre_norm=False):
        super().__init__()
        self.stride = 4 if is_stem else 2
        self.pad_to = self.stride if (is_stem or not use_conv_embed) else 1
        if use_conv_embed:
            kernel, padding = (7, 2) if is_stem else (3, 1)
        else:
            kernel, padding = self.stride, 0
        if use_pre_norm:
            self.pre_norm = nn.GroupNorm(1, in_chans)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=self.stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        """x: ``b x C_in x H x W`` -> ``b x ceil(H/s) x ceil(W/s) x C``."""
        if hasattr(self, "pre_norm"):
            x = self.pre_norm(x)
        x = F.pad(x, (0, -x.shape[-1] % self.pad_to, 0, -x.shape[-2] % self.pad_to))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class FocalStage(nn.Module):
    """``depth`` blocks, then (except the last stage) the downsampler (the original's ``BasicLayer``)."""

    def __init__(self, dim, depth, downsample, use_checkpoint=False, use_conv_embed=False, use_pre_norm=False,
                 expand_layer="all", expand_size=3, **block_kwargs):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        skip = {"all": None, "even": 0, "odd": 1}[expand_layer]
        self.blocks = nn.ModuleList([
            FocalTransformerBlock(
                dim, expand_size=0 if j % 2 == skip else expand_size,
                **{k: (v[j] if k == "drop_path" else v) for k, v in block_kwargs.items()},
            )
            for j in range(depth)
        ])
        self.downsample = PatchEmbed(dim, 2 * dim, False, use_conv_embed, True, use_pre_norm) if downsample else None

    def forward(self, x):
        """x: ``b x H x W x C`` -> (stage output ``b x H x W x C``, downsampled ``b x H/2 x W/2 x 2C`` or None)."""
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint and self.training else block(x)
        return x, (self.downsample(x.permute(0, 3, 1, 2)) if self.downsample is not None else None)


class FocalTransformer(nn.Module):
    """The Focal Transformer without its classifier; the defaults are the published Focal-T.

    Args:
        in_chans, embed_dim (C0; stage i has C0 * 2**i channels), depths, num_heads, window_size,
        mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate (rising linearly
        from 0 over all blocks), patch_norm, use_checkpoint, focal_stages (stages with pooled
        keys), focal_levels (per stage, 0..2), focal_windows (per stage, odd), focal_pool,
        expand_sizes (per stage), expand_layer ("all", "even" or "odd": which blocks lack the ring),
        use_conv_embed, use_layerscale, layerscale_value, use_pre_norm: the original's arguments.
        pretrain_img_size: the size the weights were trained at; a stage whose map is at most
            ``window_size`` at that size has no ring (as in the original).
        out_indices: stages whose output (before downsampling, through ``norm{i}``) is returned.
    Forward: ``x`` b x in_chans x H x W -> ``{"res{i+2}": b x C_i x ceil(H/2**(i+2)) x ceil(W/2**(i+2))}``.
    """

    def __init__(self, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                 mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2,
                 patch_norm=True, use_checkpoint=False, focal_stages=(0, 1, 2, 3), focal_levels=(2, 2, 2, 2),
                 focal_windows=(7, 5, 3, 1), focal_pool="fc", expand_sizes=(3, 3, 3, 3), expand_layer="all",
                 use_conv_embed=False, use_layerscale=False, layerscale_value=1e-4, use_pre_norm=False,
                 pretrain_img_size=224, out_indices=(0, 1, 2, 3)):
        super().__init__()
        num_stages = len(depths)
        for name, value in (("NUM_HEADS", num_heads), ("FOCAL_LEVELS", focal_levels),
                            ("FOCAL_WINDOWS", focal_windows), ("EXPAND_SIZES", expand_sizes)):
            if len(value) != num_stages:
                raise ValueError(f"MODEL.FOCAL.{name}={list(value)} needs one value per stage ({num_stages}, from DEPTHS)")
        for i in range(num_stages):
            if embed_dim * 2 ** i % num_heads[i]:
                raise ValueError(f"MODEL.FOCAL.NUM_HEADS[{i}]={num_heads[i]} does not divide the {embed_dim * 2 ** i} channels")
            if not 0 <= focal_levels[i] <= 2:
                raise ValueError(
                    f"MODEL.FOCAL.FOCAL_LEVELS[{i}]={focal_levels[i]}: only 0, 1 and 2 are supported (the original's "
                    "path for more levels is broken, and no published model uses it)"
                )
            if focal_windows[i] % 2 == 0:
                raise ValueError(f"MODEL.FOCAL.FOCAL_WINDOWS[{i}]={focal_windows[i]} must be odd")
            if not 0 <= expand_sizes[i] < window_size:
                raise ValueError(f"MODEL.FOCAL.EXPAND_SIZES[{i}]={expand_sizes[i]} must be in [0, WINDOW_SIZE)")
        if focal_pool not in POOL_METHODS:
            raise ValueError(f"MODEL.FOCAL.FOCAL_POOL={focal_pool!r}: expected one of {POOL_METHODS}")
        if expand_layer not in ("all", "even", "odd"):
            raise ValueError(f"MODEL.FOCAL.EXPAND_LAYER={expand_layer!r}: expected 'all', 'even' or 'odd'")
        self.in_chans = in_chans
        self.num_features = [embed_dim * 2 ** i for i in range(num_stages)]
        self.out_indices = tuple(out_indices)

        self.patch_embed = PatchEmbed(in_chans, embed_dim, True, use_conv_embed, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            pretrain_side = pretrain_img_size // 4 // 2 ** i
            self.layers.append(FocalStage(
                self.num_features[i], depths[i], downsample=i < num_stages - 1, use_checkpoint=use_checkpoint,
                use_conv_embed=use_conv_embed, use_pre_norm=use_pre_norm, expand_layer=expand_layer,
                expand_size=expand_sizes[i] if pretrain_side > window_size else 0,
                num_heads=num_heads[i], window_size=window_size, focal_window=focal_windows[i],
                focal_level=focal_levels[i], pool_method=focal_pool if i in focal_stages else "none",
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=rates[start:start + depths[i]], use_layerscale=use_layerscale,
                layerscale_value=layerscale_value,
            ))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # the original's init: also overwrites the fc pooling's mean-pool start
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"FocalTransformer expects images b x {self.in_chans} x H x W, got {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))
        outs = {}
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            if i in self.out_indices:
                outs[f"res{i + 2}"] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
        return outs


def focal_classification_state_dict(state_dict):
    """The backbone tensors of an official Focal Transformer classification checkpoint.

    Args:
        state_dict: the file's content: the state_dict itself, or a dict with it under "model".
    Returns:
        ``(backbone, dropped)``: every tensor except the classifier (``head.*`` and the final
        ``norm.*``) under its own name, and the dropped names; ``(None, [])`` if this is not a
        Focal classification checkpoint (no ``patch_embed.proj.weight`` and
        ``layers.0.blocks.0.attn.relative_position_bias_table`` at the top level).
    """
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if not {"patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table"} <= set(state_dict):
        return None, []
    dropped = sorted(k for k in state_dict if k.startswith(("head.", "norm.")))
    return {k: v for k, v in state_dict.items() if not k.startswith(("head.", "norm."))}, dropped


@BACKBONE_REGISTRY.register()
class D2FocalTransformer(DenseMapsBackbone, FocalTransformer):
    """The Focal Transformer built from ``cfg.MODEL.FOCAL.*``: ``res2..res5`` dense maps
    ``b x C_i x H/s x W/s`` (strides 4, 8, 16, 32; the input is padded to a multiple of 32)."""

    @configurable
    def __init__(self, *, out_features=OUT_FEATURES, **focal_kwargs):
        out_indices = check_out_features(out_features, "MODEL.FOCAL.OUT_FEATURES")
        FocalTransformer.__init__(self, out_indices=out_indices, **focal_kwargs)
        self._set_outputs(out_features, self.num_features)

    forward = FocalTransformer.forward

    @classmethod
    def from_config(cls, cfg, input_shape):
        focal = cfg.MODEL.FOCAL
        if focal.USE_SHIFT:
            raise ValueError("MODEL.FOCAL.USE_SHIFT=True is not supported (no published Focal model uses the shift)")
        if focal.APE:
            raise ValueError("MODEL.FOCAL.APE=True is not supported (no published Focal model uses it)")
        if sorted(focal.EXPAND_STAGES) != list(range(len(focal.DEPTHS))):
            raise ValueError(
                f"MODEL.FOCAL.EXPAND_STAGES={list(focal.EXPAND_STAGES)}: the original ignores this key and expands "
                "every stage; set MODEL.FOCAL.EXPAND_SIZES[i] = 0 to drop stage i's ring"
            )
        return dict(
            in_chans=input_shape.channels,
            embed_dim=focal.EMBED_DIM,
            depths=list(focal.DEPTHS),
            num_heads=list(focal.NUM_HEADS),
            window_size=focal.WINDOW_SIZE,
            mlp_ratio=focal.MLP_RATIO,
            qkv_bias=focal.QKV_BIAS,
            qk_scale=focal.QK_SCALE,
            drop_rate=focal.DROP_RATE,
            attn_drop_rate=focal.ATTN_DROP_RATE,
            drop_path_rate=focal.DROP_PATH_RATE,
            patch_norm=focal.PATCH_NORM,
            use_checkpoint=focal.USE_CHECKPOINT,
            focal_stages=list(focal.FOCAL_STAGES),
            focal_levels=list(focal.FOCAL_LEVELS),
            focal_windows=list(focal.FOCAL_WINDOWS),
            focal_pool=focal.FOCAL_POOL,
            expand_sizes=list(focal.EXPAND_SIZES),
            expand_layer=focal.EXPAND_LAYER,
            use_conv_embed=focal.USE_CONV_EMBED,
            use_layerscale=focal.USE_LAYERSCALE,
            layerscale_value=focal.LAYERSCALE_VALUE,
            use_pre_norm=focal.USE_PRE_NORM,
            pretrain_img_size=focal.PRETRAIN_IMG_SIZE,
            out_features=list(focal.OUT_FEATURES),
        )


@BACKBONE_REGISTRY.register()
class D2FocalTransformerTokens(MapsAsTokens, D2FocalTransformer):
    """``D2FocalTransformer`` (same config, parameters and checkpoints) with its maps handed on
    as grid tokens with positions, for the point-cloud pixel and transformer decoders."""
