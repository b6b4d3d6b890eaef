"""Cluster attention (local attention over the nearest clusters, with a blank token) and the block.

See docs/aff.md (attention) and the paper's section 3. The relative-position bias is a
per-head linear function (``pos_embed``, Linear(5, h)) of the 5 features of the
neighbour - query offset. The original evaluates it on a fixed table of offsets up to 2048 px
(clamping larger ones) for every block and forward; here the features are computed exactly for
the offsets a stage uses, once per stage, and each block applies its Linear to those only.
"""
import torch
from torch import nn

import clusten
from ..point_utils import over_token_chunks

from ..image_rng import images_rand

__all__ = ["neighbourhood_attention", "ClusterAttention", "ClusterTransformerBlock", "Mlp", "DropPath"]


def neighbourhood_attention(q, key, value, nbhd_idx, bias, nbhd_valid, blank_k, blank_v, dropout_p=0.0, fused=False):
    """Softmax attention of each query over its neighbourhood plus a blank token.

    With ``fused`` (and local attention without dropout) it runs ``clusten.cluster_attention``,
    which computes the same thing in one pass (on CPU without autograd: the chain itself, the
    faster path there); otherwise the unfused chain of the original,
    ``clusten.cluster_attention_reference``.

    Args:
        q: ``b x h x n x c'`` (already scaled); key, value: ``b x h x n x c'``.
        nbhd_idx: ``b x n x M`` int64 token indices, or None for global attention (every query
            attends to all n tokens, M = n, in token order).
        bias: ``b x h x n x M`` relative-position bias (broadcastable over b).
        nbhd_valid: ``b x n x M`` bool, False on padding slots, or None.
        blank_k, blank_v: ``h x c'`` the blank token's key and value.
        dropout_p: attention dropout probability (0 in eval).
        fused: use the fused op where it applies.
    Returns:
        ``b x h x n x c'``.
    """
    bias = bias.expand(q.shape[0], -1, -1, -1)
    if fused and nbhd_idx is not None and dropout_p == 0:
        return clusten.cluster_attention(q, key, value, nbhd_idx, bias, nbhd_valid, blank_k, blank_v)
    return clusten.cluster_attention_reference(q, key, value, nbhd_idx, bias, nbhd_valid, blank_k, blank_v,
                                               dropout_p=dropout_p)


class ClusterAttention(nn.Module):
    """Multi-head attention of each token over its neighbourhood, with a blank token.

    Parameters (checkpoint names): ``q`` (C -> C), ``kv`` (C -> 2C, per head ``[K_head | V_head]``),
    ``blank_k``, ``blank_v`` (C each, split per head), ``pos_embed`` (Linear(5, h)), ``proj``.
    """

    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0, fused=False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} does not divide dim={dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.blank_k = nn.Parameter(torch.randn(dim))
        self.blank_v = nn.Parameter(torch.randn(dim))
        self.pos_embed = nn.Linear(5, num_heads)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused = fused

    def forward(self, feat, nbhd_idx, nbhd_valid, rel_features):
        """
        Args:
            feat: ``b x n x C``.
            nbhd_idx: ``b x n x M`` int64, or None for global attention (M = n).
            nbhd_valid: ``b x n x M`` bool or None.
            rel_features: ``b' x n x M x 5`` float32 features of the neighbour - query offsets
                (``relative_position_features``; b' is b or 1).
        Returns:
            ``b x n x C``.
        """
        return self.attend(feat, *self.keys_values(feat), nbhd_idx, nbhd_valid, rel_features)

    def keys_values(self, feat):
        """``feat`` b x n x C -> the keys and values ``b x h x n x C/h`` of all tokens.

        Views of one projection, except in CPU inference: there the unfused chain reads them
        once per chunk of queries and would copy a strided view each time, so they are made
        contiguous once here."""
        b, n, c = feat.shape
        kv = self.kv(feat).reshape(b, n, self.num_heads, 2, c // self.num_heads).permute(3, 0, 2, 1, 4)
        if feat.device.type == "cpu" and not torch.is_grad_enabled():
            return kv[0].contiguous(), kv[1].contiguous()
        return kv[0], kv[1]

    def attend(self, feat, key, value, nbhd_idx, nbhd_valid, rel_features):
        """The attention output of the query tokens ``feat`` (b x q x C) over the keys and values of
        ``keys_values``; nbhd_idx, nbhd_valid, rel_features are the queries' rows (see ``forward``).
        Returns ``b x q x C``."""
        b, n, c = feat.shape
        h = self.num_heads
        q = (self.q(feat) * self.scale).reshape(b, n, h, c // h).transpose(1, 2)
        bias = self.pos_embed(rel_features.to(self.pos_embed.weight.dtype)).permute(0, 3, 1, 2)
        out = neighbourhood_attention(
            q, key, value, nbhd_idx, bias, nbhd_valid,
            self.blank_k.reshape(h, c // h), self.blank_v.reshape(h, c // h),
            dropout_p=self.attn_drop if self.training else 0.0, fused=self.fused,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, fused={self.fused}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero an image's residual branch with probability p (``x``:
    ``b x ...``, one image per row; each image draws from its own generator, ``images_rand``)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        draws = images_rand(x.shape[0], device=x.device)
        mask = (draws < keep).to(x.dtype).view((x.shape[0],) + (1,) * (x.dim() - 1))
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


class ClusterTransformerBlock(nn.Module):
    """Pre-norm block: ``x += DropPath(g1 * Attn(LN1 x)); x += DropPath(g2 * MLP(LN2 x))``.

    ``gamma1``/``gamma2`` (layer scale) exist only when ``layer_scale > 0``.
    """

    def __init__(self, dim, num_heads, mlp_ratio=2.0, drop=0.0, attn_drop=0.0, drop_path=0.0, layer_scale=0.0,
                 fused_attention=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClusterAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop, fused=fused_attention)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if layer_scale > 0:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, feat, nbhd_idx, nbhd_valid, rel_features):
        """``feat`` b x n x C -> b x n x C; the other arguments as in ``ClusterAttention``.

        In inference the queries run a chunk of tokens at a time (``over_token_chunks``) over
        the keys and values of all tokens: bounded memory for large images, same result.
        """
        normed = self.norm1(feat)
        key, value = self.attn.keys_values(normed)

        def block(feat, normed, nbhd_idx, nbhd_valid, rel_features):
            attn = self.attn.attend(normed, key, value, nbhd_idx, nbhd_valid, rel_features)
            if self.gamma1 is not None:
                attn = self.gamma1 * attn
            feat = feat + self.drop_path(attn)
            mlp = self.mlp(self.norm2(feat))
            if self.gamma2 is not None:
                mlp = self.gamma2 * mlp
            return feat + self.drop_path(mlp)

        return over_token_chunks(block, feat.shape[1], feat, normed, nbhd_idx, nbhd_valid, rel_features)
