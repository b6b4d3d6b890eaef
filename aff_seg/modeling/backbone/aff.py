"""The AutoFocusFormer backbone as a plain ``nn.Module`` (no detectron2).

See docs/aff.md and the paper (AutoFocusFormer, CVPR 2023). Stem -> 4 stages; each stage clusters its
tokens along a space-filling curve, runs cluster-attention blocks over the nearest clusters and
(stages 1-3) keeps a quarter of the tokens by adaptive downsampling. Parameter names and shapes
are those of the official checkpoints (docs/checkpoints.md).

Everything that depends on positions only (clustering, neighbourhoods, the features of the
relative offsets) is computed once per stage and shared by its blocks. Stage 1's tokens are the
full grid, identical for every image, so its clustering is computed for one image and
broadcast. Nothing is cached between calls, so batch and canvas size may change freely.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from detectron2.layers import get_norm

from ..point_utils import gather_points, grid_positions, over_token_chunks, relative_position_features
from .attention import ClusterTransformerBlock
from .clustering import cluster_neighbourhoods, space_filling_cluster
from .merging import ClusterMerging, merge_count, reserve_count

__all__ = ["AFF", "AFFStage", "PatchEmbed", "AFF_SIZES", "MIN_INPUT_SIZE"]

PATCH_SIZE = 4
MIN_INPUT_SIZE = 32  # a smaller image leaves too few tokens for the reserved grid of stage 3

# published model sizes (the paper's table of variants, the original repository's configs): keyword
# arguments of ``AFF``
AFF_SIZES = {
    "mini": dict(embed_dim=(32, 128, 256, 384), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), mlp_ratio=2.0),
    "tiny": dict(embed_dim=(64, 128, 256, 512), depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0),
    "small": dict(
        embed_dim=(96, 192, 384, 768), depths=(3, 4, 18, 2), num_heads=(3, 6, 12, 24), mlp_ratio=3.0, layer_scale=1e-5
    ),
    "base": dict(
        embed_dim=(128, 256, 512, 1024), depths=(3, 4, 18, 2), num_heads=(4, 8, 16, 32), mlp_ratio=3.0,
        layer_scale=1e-5, cluster_size=24, nbhd_size=(144, 144, 144, 144),
    ),
}
for _name in ("mini", "tiny", "small"):
    AFF_SIZES[f"{_name}_1_5th"] = dict(AFF_SIZES[_name], ds_rate=0.2)


class PatchEmbed(nn.Module):
    """Stem: pad to a multiple of 4, conv3x3/2 -> BN -> GELU -> conv3x3/2, flatten, LayerNorm.

    ``norm``: the BatchNorm, a detectron2 ``get_norm`` name ("BN" as the original: statistics of
    each process's batch; "naiveSyncBN" or, on GPUs, "SyncBN": of the whole batch of all processes).
    Returns positions ``(i mod w, i div w)`` (float32) of the row-major stride-4 grid.
    """

    def __init__(self, in_chans=3, embed_dim=32, patch_norm=True, norm="BN"):
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1)
        self.bn = get_norm(norm, embed_dim // 2)
        self.act1 = nn.GELU()
        self.proj2 = nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        """``x`` b x 3 x H x W -> pos ``b x n x 2``, feat ``b x n x C``, h, w (n = h*w)."""
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % PATCH_SIZE, 0, -H % PATCH_SIZE))
        x = self.proj2(self.act1(self.bn(self.proj1(x))))
        b, _, h, w = x.shape
        if torch.jit.is_tracing():  # plain ints under torch.jit.trace (the clustering rounds them)
            h, w = int(h), int(w)
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return grid_positions(h, w, b, x.device), x, h, w


class AFFStage(nn.Module):
    """One stage: cluster -> neighbourhoods -> blocks -> (adaptive downsampling).

    Args:
        dim, out_dim: channels in and after downsampling (out_dim None: no downsampling).
        cluster_size: m; nbhd_size: neighbourhood size (rounded to a multiple of m); when it is
            at least the number of tokens the stage uses global attention.
        depth, num_heads, mlp_ratio, drop, attn_drop, drop_path (list per block), layer_scale:
            block settings; fused_attention: use clusten's fused cluster-attention op;
        alpha, ds_rate, reserve_on: downsampling settings.
    """

    def __init__(self, dim, out_dim, cluster_size, nbhd_size, depth, num_heads, mlp_ratio=2.0,
                 alpha=4.0, ds_rate=0.25, reserve_on=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 layer_scale=0.0, fused_attention=False):
        super().__init__()
        self.dim = dim
        self.cluster_size = cluster_size
        self.nbhd_size = nbhd_size
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            ClusterTransformerBlock(dim, num_heads, mlp_ratio=mlp_ratio, drop=drop, attn_drop=attn_drop,
                                    drop_path=drop_path[i], layer_scale=layer_scale,
                                    fused_attention=fused_attention)
            for i in range(depth)
        ])
        if out_dim is not None:
            self.downsample = ClusterMerging(dim, out_dim, alpha=alpha, ds_rate=ds_rate, reserve_on=reserve_on)
            self.prob_net = nn.Linear(dim, 1)
        else:
            self.downsample = None

    def neighbourhoods(self, pos, h, w, on_grid):
        """Cluster the tokens and build their attention neighbourhoods.

        Args:
            pos: ``b x n x 2``; h, w: the stride-4 canvas; on_grid: the tokens are the full
                grid, identical for every image (stage 1), so one image's result is broadcast.
        Returns:
            order: ``b' x n`` clustered token order, or None if unchanged;
            nbhd_idx ``b' x n x M`` or None (global attention); nbhd_valid ``b' x n x M`` or
            None; rel_features ``b' x n x M x 5`` of the neighbour - token offsets
            (b' = 1 on the grid, else b).
        """
        if on_grid:
            pos = pos[:1]
        n = pos.shape[1]
        m = self.cluster_size
        if self.nbhd_size >= n:  # global attention
            offset = pos.unsqueeze(1) - pos.unsqueeze(2)  # [i, j] = pos_j - pos_i
            return None, None, None, relative_position_features(offset)
        k = (n + m - 1) // m
        num_clusters = min(int(round(self.nbhd_size / m)), k)
        if m == 1:  # one token per cluster: no reordering
            order, cluster_mean = None, pos
        else:
            order, pos, cluster_mean = space_filling_cluster(pos, m, h, w)
        nbhd_idx, nbhd_valid = cluster_neighbourhoods(pos, cluster_mean, m, num_clusters)
        rel_features = over_token_chunks(
            lambda query, idx: relative_position_features(gather_points(pos, idx) - query.unsqueeze(2)),
            n, pos, nbhd_idx)
        return order, nbhd_idx, nbhd_valid, rel_features

    def forward(self, pos, feat, h, w, stride, on_grid=False):
        """
        Args:
            pos: ``b x n x 2`` float32; feat: ``b x n x C``; h, w: stride-4 canvas size;
            stride: 2, 4, 8, 16 for stages 1-4; on_grid: see ``neighbourhoods``.
        Returns:
            ``(pos, feat)`` of this stage in clustered order and ``(pos_down, feat_down)`` after
            downsampling (the same tensors for the last stage).
        """
        b, n, c = feat.shape
        order, nbhd_idx, nbhd_valid, rel_features = self.neighbourhoods(pos, h, w, on_grid)
        if order is not None:
            order = order.expand(b, -1)
            pos = pos.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
            feat = feat.gather(1, order.unsqueeze(-1).expand(-1, -1, c))
        if nbhd_idx is not None:
            nbhd_idx = nbhd_idx.expand(b, -1, -1)
            nbhd_valid = nbhd_valid.expand(b, -1, -1) if nbhd_valid is not None else None
        for block in self.blocks:
            feat = block(feat, nbhd_idx, nbhd_valid, rel_features)
        if self.downsample is None:
            return pos, feat, pos, feat
        importance = self.prob_net(feat).sigmoid()  # b x n x 1
        pos_down, feat_down = self.downsample(
            pos, feat, nbhd_idx, nbhd_valid, importance, stride, reserve_count(h, w, stride)
        )
        return pos, feat, pos_down, feat_down

    def extra_repr(self):
        return f"dim={self.dim}, cluster_size={self.cluster_size}, nbhd_size={self.nbhd_size}"


class AFF(nn.Module):
    """AutoFocusFormer backbone (the defaults are AFF-Mini; ``AFF(**AFF_SIZES[name])`` builds any
    published size).

    Args:
        in_chans: input channels. embed_dim, depths, num_heads, nbhd_size: per stage.
        cluster_size, mlp_ratio, alpha, ds_rate, reserve_on, layer_scale: see docs/aff.md
            (``MODEL.AFF.*`` keys of the original repository's configs).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth
            (rising linearly from 0 over all blocks).
        patch_norm: LayerNorm after the stem. stem_norm: the stem's BatchNorm (``PatchEmbed``).
        out_indices: stages whose output is returned.
        fused_attention: run local attention through ``clusten.cluster_attention`` (same
            result as the unfused reference chain; not with attention dropout).
    Forward: ``x`` b x in_chans x H x W (H, W >= 32) -> dict with, for each output stage i,
        ``res{i+2}`` (b x n_i x C_i, after ``norm{i}``), ``res{i+2}_pos`` (b x n_i x 2 float32,
        (x, y) in stride-4 grid units) and ``res{i+2}_spatial_shape`` ((h, w) of that grid).
    """

    def __init__(self, in_chans=3, embed_dim=(32, 128, 256, 384), cluster_size=8, nbhd_size=(48, 48, 48, 48),
                 alpha=4.0, ds_rate=0.25, reserve_on=True, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                 mlp_ratio=2.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, patch_norm=True,
                 stem_norm="BN", layer_scale=0.0, out_indices=(0, 1, 2, 3), fused_attention=False):
        super().__init__()
        num_stages = len(depths)
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("nbhd_size", nbhd_size)):
            if len(value) != num_stages:
                raise ValueError(f"{name}={list(value)} needs one value per stage ({num_stages}, from depths)")
        for i, (dim, heads) in enumerate(zip(embed_dim, num_heads)):
            if dim % heads != 0:
                raise ValueError(f"num_heads[{i}]={heads} does not divide embed_dim[{i}]={dim}")
        if embed_dim[0] % 2 != 0:
            raise ValueError(f"embed_dim[0]={embed_dim[0]} must be even (the stem's first conv has half of it)")
        if not 0 < ds_rate <= 1:
            raise ValueError(f"ds_rate={ds_rate} must be in (0, 1]")
        if not (math.isfinite(alpha) and alpha >= 0):  # a negative weight would rank important tokens last
            raise ValueError(f"alpha={alpha} (MODEL.AFF.ALPHA) must be finite and >= 0")
        if cluster_size < 1:
            raise ValueError(f"cluster_size={cluster_size} must be positive")
        self.in_chans = in_chans
        self.num_features = list(embed_dim)
        self.out_indices = tuple(out_indices)

        self.patch_embed = PatchEmbed(in_chans, embed_dim[0], patch_norm=patch_norm, norm=stem_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(AFFStage(
                embed_dim[i], embed_dim[i + 1] if i < num_stages - 1 else None, cluster_size, nbhd_size[i],
                depths[i], num_heads[i], mlp_ratio=mlp_ratio, alpha=alpha, ds_rate=ds_rate,
                reserve_on=reserve_on, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=rates[start:start + depths[i]], layer_scale=layer_scale,
                fused_attention=fused_attention,
            ))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim[i]))

    def size_branches(self, height, width):
        """The input-size dependent branches an exported graph is fixed to, for a ``height x width``
        input: per stage, whether it attends globally (``nbhd_size >= n``) and whether its
        downsampling reserves a single grid token (a size-1 dimension, which an export traced at
        more specialises). A list of (bool, bool), one per stage."""
        h, w = -(-height // PATCH_SIZE), -(-width // PATCH_SIZE)
        n, out = h * w, []
        for i, stage in enumerate(self.layers):
            reserve = 0
            if stage.downsample is not None and stage.downsample.reserve_on:
                reserve = reserve_count(h, w, 2 ** (i + 1))
            out.append((stage.nbhd_size >= n, reserve == 1))
            if stage.downsample is not None:
                n = merge_count(n, stage.downsample.ds_rate, reserve)
        return out

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[0] == 0:
            raise ValueError(
                f"AFF expects a non-empty batch b x {self.in_chans} x H x W, got x of shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"AFF needs images of at least {MIN_INPUT_SIZE} x {MIN_INPUT_SIZE} pixels, got "
                f"{x.shape[-2]} x {x.shape[-1]}"
            )
        pos, feat, h, w = self.patch_embed(x)
        feat = self.pos_drop(feat)
        outs = {}
        for i, stage in enumerate(self.layers):
            pos_out, feat_out, pos, feat = stage(pos, feat, h, w, stride=2 ** (i + 1), on_grid=i == 0)
            if i in self.out_indices:
                outs[f"res{i + 2}"] = getattr(self, f"norm{i}")(feat_out)
                outs[f"res{i + 2}_pos"] = pos_out
                outs[f"res{i + 2}_spatial_shape"] = (h, w)
        return outs
