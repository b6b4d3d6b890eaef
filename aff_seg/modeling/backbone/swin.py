"""Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021) as the detectron2 backbone ``D2SwinTransformer`` of Mask2Former.

Config keys (``MODEL.SWIN.*``), module structure and state_dict names are Mask2Former's
(facebookresearch/Mask2Former ``mask2former/modeling/backbone/swin.py``), so its converted
ImageNet weights (``swin_*.pkl``) and the released Mask2Former / FASeg Swin checkpoints load.
The backbone returns dense maps ``{res2..res5: b x C_i x H/s_i x W/s_i}`` (``output_format``
"maps"), each after its own LayerNorm ``norm{i}``.

Differences from the original: the weights are initialised as its ``init_weights`` intends
(truncated normal 0.02 for Linear layers; the original defines that function but never applies
it, so they start at PyTorch's defaults), window attention runs through
``F.scaled_dot_product_attention``, and stage freezing (never enabled by the configs) is left out.
"""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY

from .attention import DropPath, Mlp
from .base import OUT_FEATURES, DenseMapsBackbone, check_out_features

__all__ = ["SwinTransformer", "D2SwinTransformer"]


def window_partition(x, window_size):
    """``b x H x W x c`` (H, W multiples of window_size) -> ``(b * nW) x window_size**2 x c``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows, window_size, h, w):
    """Inverse of ``window_partition``: ``(b * nW) x window_size**2 x c`` -> ``b x h x w x c``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias per
    head (a ``(2ws-1)^2 x heads`` table indexed by the relative offset of two positions)."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)  # 2 x ws*ws
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # ws*ws x ws*ws x 2
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        """x: ``(b * nW) x n x c``; mask: ``nW x n x n`` (0 / -100) or None -> ``(b * nW) x n x c``."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # 1 x heads x n x n
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask[None, :, None].to(q.dtype)).expand(bw // nw, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: (shifted) window attention, then the MLP, each with a residual."""

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size={shift_size} must lie in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, h, w, attn_mask):
        """x: ``b x h*w x c``; attn_mask: the shifted windows' mask -> ``b x h*w x c``."""
        b, _, c = x.shape
        ws = self.window_size
        y = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift_size:
            y = torch.roll(y, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask=attn_mask if self.shift_size else None)
        y = window_reverse(y, ws, hp, wp)
        if self.shift_size:
            y = torch.roll(y, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        y = y[:, :h, :w].reshape(b, h * w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4c), normalised and projected to 2c."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, h, w):
        """``b x h*w x c`` -> ``b x ceil(h/2)*ceil(w/2) x 2c``."""
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain and shifted windows, then (optionally) a
    patch merging."""

    def __init__(self, dim, depth, num_heads, window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=(), downsample=True, use_checkpoint=False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio,
                                 qkv_bias, qk_scale, drop, attn_drop, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def shifted_window_mask(self, h, w, device):
        """``nW x ws*ws x ws*ws``: -100 between positions that the cyclic shift brought from
        different regions of the padded map, 0 elsewhere."""
        ws, shift = self.window_size, self.shift_size
        # ceil division without negative operands (exported sizes, see merging.reserve_count)
        hp, wp = (h + ws - 1) // ws * ws, (w + ws - 1) // ws * ws
        region = torch.zeros((1, hp, wp, 1), device=device)
        bounds = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for i, hs in enumerate(bounds):
            for j, vs in enumerate(bounds):
                region[:, hs, vs, :] = 3 * i + j
        windows = window_partition(region, ws).squeeze(-1)  # nW x ws*ws
        diff = windows.unsqueeze(1) - windows.unsqueeze(2)
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)

    def forward(self, x, h, w):
        """``b x h*w x c`` -> (stage output ``b x h*w x c``, next stage input and its h, w)."""
        mask = self.shifted_window_mask(h, w, x.device)
        for blk in self.blocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, h, w, mask, use_reentrant=False)
            else:
                x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches (input zero-padded to a multiple) -> ``embed_dim``."""

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, patch_norm=True):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        """``b x 3 x H x W`` -> ``b x embed_dim x ceil(H/p) x ceil(W/p)``."""
        p = self.patch_size
        x = F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p))
        x = self.proj(x)
        if self.norm is not None:
            h, w = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, self.embed_dim, h, w)
        return x


class SwinTransformer(nn.Module):
    """The Swin backbone: patch embedding, 4 stages, a LayerNorm ``norm{i}`` per output stage."""

    def __init__(self, pretrain_img_size=224, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.2, ape=False, patch_norm=True, out_indices=(0, 1, 2, 3),
                 use_checkpoint=False):
        super().__init__()
        self.num_layers = len(depths)
        self.ape = ape
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:  # absolute position embedding at the pretraining resolution, resized on use
            side = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, side, side))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth, linear in depth
        self.num_features = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.layers = nn.ModuleList(
            BasicLayer(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale,
                       drop_rate, attn_drop_rate, rates[sum(depths[:i]):sum(depths[:i + 1])],
                       downsample=i < self.num_layers - 1, use_checkpoint=use_checkpoint)
            for i in range(self.num_layers)
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x):
        """``b x 3 x H x W`` -> ``{res{i+2}: b x C_i x ceil(H/2^(i+2)) x ceil(W/2^(i+2))}``."""
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs = {}
        for i, layer in enumerate(self.layers):
            out, x, h_next, w_next = layer(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs[f"res{i + 2}"] = out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            h, w = h_next, w_next
        return outs


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(DenseMapsBackbone, SwinTransformer):
    """``SwinTransformer`` built from ``MODEL.SWIN.*``; see ``DenseMapsBackbone`` for the outputs
    (``MODEL.SWIN.OUT_FEATURES``)."""

    @configurable
    def __init__(self, *, out_features=OUT_FEATURES, **kwargs):
        check_out_features(out_features, "MODEL.SWIN.OUT_FEATURES")
        SwinTransformer.__init__(self, **kwargs)
        self._set_outputs(out_features, self.num_features)

    def forward(self, x):
        """``b x 3 x H x W`` -> the ``OUT_FEATURES`` maps."""
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer takes a b x C x H x W input, got shape {tuple(x.shape)}")
        return {k: v for k, v in SwinTransformer.forward(self, x).items() if k in self._out_features}

    @classmethod
    def from_config(cls, cfg, input_shape):
        swin = cfg.MODEL.SWIN
        return dict(
            pretrain_img_size=swin.PRETRAIN_IMG_SIZE,
            patch_size=swin.PATCH_SIZE,
            in_chans=input_shape.channels,
            embed_dim=swin.EMBED_DIM,
            depths=list(swin.DEPTHS),
            num_heads=list(swin.NUM_HEADS),
            window_size=swin.WINDOW_SIZE,
            mlp_ratio=swin.MLP_RATIO,
            qkv_bias=swin.QKV_BIAS,
            qk_scale=swin.QK_SCALE,
            drop_rate=swin.DROP_RATE,
            attn_drop_rate=swin.ATTN_DROP_RATE,
            drop_path_rate=swin.DROP_PATH_RATE,
            ape=swin.APE,
            patch_norm=swin.PATCH_NORM,
            use_checkpoint=swin.USE_CHECKPOINT,
            out_features=list(swin.OUT_FEATURES),
        )
