"""Point-cloud multi-scale deformable-attention pixel decoder (docs/aff.md).

The backbone's res5/res4/res3 tokens attend to each other with deformable attention whose
sampling locations are read off the token point clouds by Shepard interpolation of the 4
nearest tokens; the res3 output is then interpolated onto the res2 tokens (all stride-4 grid
pixels), refined by a PointConv and projected to the mask features.

Precision: positions, sampling locations, Shepard weights, the attention softmax and the
aggregation always run in float32 (at least); the linear layers follow autocast.  Measured on
CPU: in bf16, a sampling location on a Cityscapes-size grid (128 x 256) lands in another grid
cell for 24% of samples and its Shepard weights are off by 0.05 on average (1.0 at worst),
whereas bf16 linear layers keep the mask features within 0.9% (relative L2) of float32
(tests/modeling/heads/test_heads_precision.py).
"""
import math
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

import clusten

from ..point_utils import (
    PointConv,
    autocast_off,
    gather_points,
    grid_positions,
    over_token_chunks,
    shepard_interpolate,
    shepard_neighbours,
    shepard_weights,
)
from ..transformer_decoder.position_encoding import PointPositionEmbeddingSine
from ..variants import resolve_variant
from .msdeformattn import MSDeformAttn, reset_encoder_parameters

__all__ = ["build_pixel_decoder", "MSDeformAttnPc", "MSDeformAttnPixelDecoderPc"]

# the FPN step interpolates res3 onto res2 from the 4 nearest tokens with weights ~ d^-6
FPN_SHEPARD_K = 4  # at most SAMPLING_K: its neighbours are read off the sampling lookup
FPN_SHEPARD_POWER = 3.0
# PointConv (layer_1) neighbourhood: the token and its 8 nearest tokens
POINTCONV_K = 9
# candidate tokens per sampling location (the nb_idx lookup)
SAMPLING_K = 4


def build_pixel_decoder(cfg, input_shape):
    """Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``, the grid or
    point-cloud variant as the backbone returns (:mod:`aff_seg.modeling.variants`)."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = resolve_variant(SEM_SEG_HEADS_REGISTRY, "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", name, cfg)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} has no forward_features method, "
            "so it cannot be used as a pixel decoder"
        )
    return model


class MSDeformAttnPc(MSDeformAttn):
    """Multi-scale deformable attention on point clouds (``MSDeformAttnPc`` of the original): the
    modules and init of the grid ``MSDeformAttn`` plus the Shepard power.

    Each query token samples ``n_points`` locations per head and level at
    ``its position + offset`` (stride-4 grid units at every level).  A location's value is the
    Shepard interpolation of the 4 level tokens nearest to the rounded, clamped location
    (``nb_idx`` lookup), weighted by ``1 / ((d^2)^shepard_power + 1e-11)`` of the unrounded
    location; the samples are combined with softmax attention weights (clusten.msdetrpc).
    """

    def __init__(self, d_model=256, n_levels=3, n_heads=8, n_points=4, shepard_power=3.0,
                 shepard_power_learnable=True):
        super().__init__(d_model, n_levels, n_heads, n_points)
        if shepard_power_learnable:
            self.shepard_power = nn.Parameter(torch.full((1,), float(shepard_power)))
        else:  # a plain number: no state_dict entry (the COCO checkpoints have none)
            self.shepard_power = float(shepard_power)

    @staticmethod
    def candidate_table(poss, nb_idx):
        """The candidate tokens of every pixel of every level, as one lookup table (positions only:
        the encoder builds it once per forward for all its layers).

        Args:
            poss: list over levels of ``b x n_l x 2`` token positions.
            nb_idx: list over levels of ``b x (h*w) x k`` the level's k tokens nearest to each
                pixel of the stride-4 grid (k = 4, or all of them when the level has fewer).
        Returns:
            (idx ``(b*levels*h*w) x 4`` int64 into the concatenation of all levels' tokens,
            positions ``(b*levels*h*w) x 2 x 4`` of those tokens (x row, y row; poss' dtype), valid
            ``(b*levels*h*w) x 4`` bool or None):
            row ``(image * levels + level) * h*w + pixel``; a level with fewer than 4 tokens
            repeats its first candidate in the missing slots, which ``valid`` marks False.
        """
        idx, pos, valid = [], [], []
        start = 0
        for level_pos, level_idx in zip(poss, nb_idx):
            missing = SAMPLING_K - level_idx.shape[-1]
            valid.append(F.pad(torch.ones_like(level_idx, dtype=torch.bool), (0, missing)))
            if missing > 0:
                level_idx = torch.cat([level_idx, level_idx[..., :1].expand(-1, -1, missing)], dim=-1)
            pos.append(gather_points(level_pos, level_idx).transpose(-1, -2))
            idx.append(level_idx + start)
            start += level_pos.shape[1]
        padded = any(level_idx.shape[-1] < SAMPLING_K for level_idx in nb_idx)
        valid = torch.stack(valid, 1).view(-1, SAMPLING_K) if padded else None
        return torch.stack(idx, 1).view(-1, SAMPLING_K), torch.stack(pos, 1).view(-1, 2, SAMPLING_K), valid

    def _attend(self, query, pos, value, table, grid_hw):
        """The attention of some queries (of any levels) over all levels.

        Each sampling location reads its cell's row of the candidate table (the 4 level tokens
        nearest to the rounded, clamped location) and weighs them by Shepard weights of the
        unrounded location (gradient to the offsets and the power).

        Args:
            query: ``b x q x c`` (features + position encoding); pos: ``b x q x 2`` their positions.
            value: ``(b*heads) x n x c'`` the projected values of all levels' tokens (geometry dtype).
            table: ``candidate_table`` of all levels; grid_hw: (h, w) of the stride-4 grid.
        Returns:
            ``b x q x c`` after ``output_proj``.
        """
        b, q, c = query.shape
        nh, nl, nk = self.n_heads, self.n_levels, self.n_points
        h, w = grid_hw
        geo = value.dtype
        table_idx, table_pos, table_valid = table
        with autocast_off(query.device.type):
            query = query.to(geo)
            offsets = F.linear(query, self.sampling_offsets.weight.to(geo), self.sampling_offsets.bias.to(geo))
            logits = F.linear(query, self.attention_weights.weight.to(geo), self.attention_weights.bias.to(geo))
            # sample index m = point * levels + level (the original's inner order), per head
            attn = logits.view(b, q, nh, nl * nk).softmax(-1).view(b, q, nh, nl, nk)
            attn = attn.permute(0, 2, 1, 4, 3).reshape(b * nh, q, nk * nl)
            offsets = offsets.view(b, q, nh, nl, nk, 2).permute(0, 2, 1, 4, 3, 5).contiguous()  # b x heads x q x points x levels
            loc = pos.to(geo)[:, None, :, None, None, :] + offsets
            with torch.no_grad():
                cell = loc.round().long()
                pixel = cell[..., 1].clamp(0, h - 1) * w + cell[..., 0].clamp(0, w - 1)
                image_level = torch.arange(b * nl, device=pixel.device).view(b, 1, 1, 1, nl)
                row = (pixel + image_level * (h * w)).view(-1)
                nn_idx = table_idx.index_select(0, row).view(b * nh, q, nk * nl, SAMPLING_K)
            nbr_pos = table_pos.index_select(0, row).to(geo).view(*loc.shape[:-1], 2, SAMPLING_K)
            dx, dy = loc[..., :1] - nbr_pos[..., 0, :], loc[..., 1:] - nbr_pos[..., 1, :]
            dist2 = dx * dx + dy * dy
            # missing candidates of a level with fewer than 4 tokens weigh 0
            valid = None if table_valid is None else table_valid.index_select(0, row).view(dist2.shape)
            nn_weight = shepard_weights(dist2, self.shepard_power, valid=valid)
            out = clusten.msdetrpc(nn_idx, nn_weight.view(b * nh, q, nk * nl, SAMPLING_K), attn, value)
        return self.output_proj(out.view(b, nh, q, c // nh).transpose(1, 2).reshape(b, q, c))

    def forward(self, query, poss, value, table, grid_hw, query_pos=None):
        """
        Args:
            query: ``b x n x c`` the queries of all levels' tokens, level by level (n = sum of n_l).
            poss: list over levels of ``b x n_l x 2`` token positions.
            value: ``b x n x c`` the features sampled (without position encoding), as ``query``.
            table: ``candidate_table(poss, nb_idx)``, nb_idx the levels' 4 tokens nearest to each
                pixel of the stride-4 grid.
            grid_hw: (h, w) of the stride-4 grid.
            query_pos: ``b x n x c`` or None: the queries are ``query + query_pos``, added a
                chunk of tokens at a time (no second ``b x n x c`` tensor in inference).
        Returns:
            ``b x n x c``.
        """
        b, n, c = query.shape
        nh, nl = self.n_heads, self.n_levels
        if len(poss) != nl:
            raise ValueError(f"expected {nl} levels, got {len(poss)}")
        value = self.value_proj(value)  # b x n x c
        # geometry and aggregation in float32 at least (float64 stays float64)
        geo = torch.promote_types(query.dtype, torch.float32)
        value = value.view(b, n, nh, c // nh).transpose(1, 2).reshape(b * nh, n, c // nh).to(geo)

        def attend(query, pos, query_pos):
            return self._attend(query if query_pos is None else query + query_pos, pos, value, table, grid_hw)

        # all levels' queries at once, a chunk of them at a time in inference (bounded memory)
        return over_token_chunks(attend, n, query, torch.cat(poss, dim=1), query_pos)


class MSDeformAttnTransformerEncoderLayerPc(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=3, n_heads=8, n_points=4,
                 shepard_power=3.0, shepard_power_learnable=True):
        super().__init__()
        self.self_attn = MSDeformAttnPc(d_model, n_levels, n_heads, n_points, shepard_power,
                                        shepard_power_learnable)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, poss, pos_embed, table, grid_hw):
        """src, pos_embed: ``b x n x c``, all levels' tokens level by level; poss: list over levels
        of ``b x n_l x 2``; table: the ``MSDeformAttnPc.candidate_table`` -> ``b x n x c``."""
        attended = self.self_attn(src, poss, src, table, grid_hw, query_pos=pos_embed)
        return over_token_chunks(self._feed_forward, src.shape[1], src, attended)

    def _feed_forward(self, src, att):
        """Residual + norm, then the FFN: ``b x n x c`` (token by token)."""
        src = self.norm1(src + self.dropout1(att))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoderPc(nn.Module):
    def __init__(self, encoder_layer_kwargs, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(
            [MSDeformAttnTransformerEncoderLayerPc(**encoder_layer_kwargs) for _ in range(num_layers)]
        )

    def forward(self, src, poss, pos_embed, nb_idx, grid_hw):
        table = MSDeformAttnPc.candidate_table(poss, nb_idx)  # positions only: once for all layers
        for layer in self.layers:
            src = layer(src, poss, pos_embed, table, grid_hw)
        return src


class MSDeformAttnTransformerEncoderOnlyPc(nn.Module):
    """The encoder stack plus the per-level embedding added to the position encodings.

    The levels' tokens run as one ``b x n x c`` tensor (level by level): the queries and the
    values of the deformable attention and the feed-forward read it without concatenated copies.
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
                 num_feature_levels=3, enc_n_points=4, shepard_power=3.0, shepard_power_learnable=True):
        super().__init__()
        self.encoder = MSDeformAttnTransformerEncoderPc(
            dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                 n_heads=nhead, n_points=enc_n_points, shepard_power=shepard_power,
                 shepard_power_learnable=shepard_power_learnable),
            num_encoder_layers,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        reset_encoder_parameters(self)

    def forward(self, src, poss, position_encoding, nb_idx, grid_hw):
        """
        Args:
            src: ``b x n x c`` all levels' tokens, level by level (n = sum of n_l).
            poss: list over levels of ``b x n_l x 2`` positions.
            position_encoding: ``b x n_l x 2`` -> ``b x n_l x c``, the sine encoding.
            nb_idx: list over levels of ``b x (h*w) x 4``, the level's 4 tokens nearest to each
                pixel of the stride-4 grid; grid_hw: (h, w) of that grid.
        Returns:
            ``b x n x c``.
        """
        pos_embed = torch.cat(
            [position_encoding(p) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(poss)], dim=1)
        return self.encoder(src, poss, pos_embed, nb_idx, grid_hw)


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoderPc(nn.Module):
    """AFF's pixel decoder on token point clouds (``input_format = "tokens"``; configs name it
    ``MSDeformAttnPixelDecoder``, see :mod:`aff_seg.modeling.variants`).

    ``forward_features(features)`` takes the backbone's dict (``res{i}`` ``b x n_i x C_i``,
    ``res{i}_pos`` ``b x n_i x 2``, ``res{i}_spatial_shape`` (h, w)) and returns
    ``(mask_features b x n_2 x mask_dim, res2 positions b x n_2 x 2, res5 encoder output,
    [res5, res4, res3] encoder outputs, [res5, res4, res3] positions)``.
    """

    input_format = "tokens"

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        transformer_in_features: List[str],
        common_stride: int,
        shepard_power: float,
        shepard_power_learnable: bool,
    ):
        """
        Args:
            input_shape: backbone output shapes (channels, nominal stride) by feature name.
            transformer_dropout, transformer_nheads, transformer_dim_feedforward,
            transformer_enc_layers: the deformable encoder's settings.
            conv_dim: width of the encoder and the FPN level; mask_dim: mask feature width.
            transformer_in_features: the features the encoder attends over (res3..res5).
            common_stride: stride of the mask features (4: one FPN level, res2).
            shepard_power: exponent on the squared distance (``MODEL.AFF.SHEPARD_POWER / 2``).
            shepard_power_learnable: make it an ``nn.Parameter`` per encoder layer.
        """
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"transformer_in_features {missing} are not backbone outputs {sorted(input_shape)}")
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in ordered]  # res2 .. res5
        feature_channels = [v.channels for _, v in ordered]
        enc_shapes = [(k, v) for k, v in ordered if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in enc_shapes]  # res3 .. res5
        self.transformer_num_feature_levels = len(enc_shapes)

        # coarse to fine: input_proj.0 -> res5, .1 -> res4, .2 -> res3
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Linear(v.channels, conv_dim), nn.LayerNorm(conv_dim)) for _, v in enc_shapes[::-1]]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnlyPc(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            shepard_power=shepard_power,
            shepard_power_learnable=shepard_power_learnable,
        )
        self.pe_layer = PointPositionEmbeddingSine(conv_dim // 2)

        self.mask_features = nn.Linear(conv_dim, mask_dim)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # the transformer decoder always uses 3 levels
        min_stride = min(v.stride for _, v in enc_shapes)
        self.num_fpn_levels = int(math.log2(min_stride) - math.log2(common_stride))
        if self.num_fpn_levels != 1:
            raise ValueError(
                f"the point-cloud pixel decoder has exactly one FPN level (res2); common_stride={common_stride} "
                f"with encoder strides from {min_stride} gives {self.num_fpn_levels}"
            )
        # the FPN level: adapter_1 (Linear + LN) and layer_1 (PointConv -> LN -> ReLU)
        self.adapter_1 = nn.Sequential(nn.Linear(feature_channels[0], conv_dim), nn.LayerNorm(conv_dim))
        weight_init.c2_xavier_fill(self.adapter_1[0])
        self.layer_1 = nn.Sequential(PointConv(conv_dim, conv_dim, bias=True), nn.LayerNorm(conv_dim), nn.ReLU())

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "transformer_dim_feedforward": 1024,  # hard-coded in the original
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
            # the Shepard weights use squared distances, hence the halving
            "shepard_power": cfg.MODEL.AFF.SHEPARD_POWER / 2.0,
            "shepard_power_learnable": cfg.MODEL.AFF.SHEPARD_POWER_LEARNABLE,
        }

    def forward_features(self, features, release_features=False):
        """See the class docstring. ``release_features``: remove each feature tensor (``res{i}``)
        from ``features`` once it has been read, so that it can be freed before the large steps
        that follow (for a caller that gives the dict up; positions and shapes stay)."""
        fine = self.in_features[0]
        # (symbolic sizes stay symbolic: int() would fix an exported graph to the example's size)
        grid_hw = tuple(s if isinstance(s, torch.SymInt) else int(s) for s in features[fine + "_spatial_shape"])
        b = features[fine].shape[0]
        grid = grid_positions(grid_hw[0], grid_hw[1], b, features[fine].device)
        read = features.pop if release_features else features.__getitem__

        names = self.transformer_in_features[::-1]  # res5, res4, res3
        poss = [features[name + "_pos"].float() for name in names]
        nb_idx = [clusten.knn(grid, pos, min(SAMPLING_K, pos.shape[1])) for pos in poss]  # b x (h*w) x 4 each
        counts = [pos.shape[1] for pos in poss]
        src = torch.cat([proj(read(name)) for proj, name in zip(self.input_proj, names)], dim=1)
        out = list(self.transformer(src, poss, self.pe_layer, nb_idx, grid_hw).split(counts, dim=1))

        # FPN level: res3 encoder output interpolated onto the res2 tokens, plus the res2 adapter
        # (the res2 tokens are the grid pixels, so their res3 neighbours are rows of nb_idx[-1])
        pos2 = features[fine + "_pos"].float()
        pixel = (pos2[..., 1].long() * grid_hw[1] + pos2[..., 0].long()).unsqueeze(-1)  # b x n_2 x 1
        fpn_idx = nb_idx[-1].gather(1, pixel.expand(-1, -1, nb_idx[-1].shape[-1]))[..., :FPN_SHEPARD_K]
        fpn_idx, fpn_weights = shepard_neighbours(pos2, poss[-1], power=FPN_SHEPARD_POWER, nn_idx=fpn_idx)
        # res2-sized (b x n_2 x c) work runs a chunk of tokens at a time in inference (bounded memory)
        n2 = pos2.shape[1]

        def adapt(res2, idx, weights):
            y = self.adapter_1(res2)
            return y + shepard_interpolate(out[-1].to(y.dtype), (idx, weights))

        y = over_token_chunks(adapt, n2, read(fine), fpn_idx, fpn_weights)
        nbhd_idx = clusten.knn(pos2, pos2, POINTCONV_K, grid_hw=grid_hw)  # b x n_2 x 9, the token itself first
        offset = pos2.unsqueeze(2) - gather_points(pos2, nbhd_idx)  # centre - neighbour

        def mask_features(idx, offset):
            return self.mask_features(self.layer_1[2](self.layer_1[1](self.layer_1[0](y, idx, offset))))

        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return (over_token_chunks(mask_features, n2, nbhd_idx, offset), pos2, out[0], multi_scale_features,
                poss[: self.maskformer_num_feature_levels])
