"""Mask2Former's multi-scale deformable-attention pixel decoder on dense feature maps.

The grid model of Cheng et al., "Masked-attention Mask Transformer for Universal Image
Segmentation" (CVPR 2022), with the module and state_dict names of facebookresearch/Mask2Former:
res3..res5 are projected to ``conv_dim`` (1x1 conv + GroupNorm), refined together by a
deformable-attention encoder (Deformable DETR's, post-norm, 4 points per head and level,
sine position encoding plus a learned level embedding), and the res3 output is upsampled
onto the res2 lateral (FPN) and projected to the mask features.

The sampling runs through ``clusten.ms_deform_attn`` (PyTorch on every device); the whole
decoder runs in float32 with autocast off, as upstream's.
"""
import math
from typing import Callable, Dict, List, Optional, Union

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

import clusten

from ..point_utils import autocast_off
from ..transformer_decoder.position_encoding import PositionEmbeddingSine

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder",
    "reset_encoder_parameters",
]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): each query samples ``n_points``
    locations per head and level around its reference point and mixes them with softmax
    weights predicted from the query."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        """Offsets start on rays in the heads' 8 directions (point k at distance k cells), the
        attention uniform, the projections Xavier."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([thetas.cos(), thetas.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True)[0]
        grid = direction.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, spatial_shapes):
        """
        Args:
            query: ``b x n_q x c``.
            reference_points: ``b x n_q x levels x 2``, (x, y) in [0, 1] of each level's map.
            input_flatten: ``b x s x c``, the levels' maps flattened and concatenated.
            spatial_shapes: the levels' (h, w).
        Returns:
            ``b x n_q x c``.
        """
        b, n_q, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(b, input_flatten.shape[1], heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(b, n_q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, n_q, heads, levels * points)
        weights = weights.softmax(-1).view(b, n_q, heads, levels, points)
        # offsets are in cells of each level: normalise by (w, h)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = clusten.ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(out)


def reset_encoder_parameters(encoder):
    """Deformable DETR's encoder init (grid and point-cloud encoders): Xavier for every matrix,
    then each ``MSDeformAttn``'s own init, and ``encoder.level_embed`` ~ N(0, 1)."""
    for p in encoder.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in encoder.modules():
        if isinstance(m, MSDeformAttn):
            m._reset_parameters()
    nn.init.normal_(encoder.level_embed)


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        """src, pos: ``b x s x c``; reference_points: ``b x s x levels x 2`` -> ``b x s x c``."""
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, layer_kwargs, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(MSDeformAttnTransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def get_reference_points(spatial_shapes, batch, device):
        """The pixel centres of every level, (x, y) in [0, 1]: ``batch x s x levels x 2``
        (the same point for every level, since nothing is padded)."""
        refs = []
        for h, w in spatial_shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
                indexing="ij",
            )
            refs.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
        ref = torch.cat(refs, 0)  # s x 2
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def forward(self, src, spatial_shapes, pos):
        reference_points = self.get_reference_points(spatial_shapes, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """The encoder stack plus the per-level embedding added to the position encodings."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
                 num_feature_levels=4, enc_n_points=4):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.encoder = MSDeformAttnTransformerEncoder(
            dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                 n_heads=nhead, n_points=enc_n_points),
            num_encoder_layers,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        reset_encoder_parameters(self)

    def forward(self, srcs, pos_embeds):
        """srcs, pos_embeds: lists over levels of ``b x c x h_l x w_l`` -> (``b x s x c``, the
        levels' (h, w))."""
        spatial_shapes = [tuple(src.shape[-2:]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        pos_flatten = torch.cat([
            pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, pos in enumerate(pos_embeds)
        ], 1)
        return self.encoder(src_flatten, spatial_shapes, pos_flatten), spatial_shapes


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Upstream Mask2Former's pixel decoder on dense maps (``input_format = "maps"``).

    ``forward_features(features)`` takes ``{res2..res5: b x C_i x H/s_i x W/s_i}`` and returns
    ``(mask_features b x mask_dim x H/4 x W/4, the coarsest encoder output,
    [res5, res4, res3] encoder outputs b x conv_dim x h_l x w_l)``.
    """

    input_format = "maps"

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
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
    ):
        """
        Args:
            input_shape: backbone output shapes (channels, stride) by feature name.
            transformer_dropout, transformer_nheads, transformer_dim_feedforward,
            transformer_enc_layers: the deformable encoder's settings.
            conv_dim: width of the encoder and the FPN levels; mask_dim: mask feature width.
            norm: normalisation of the FPN convs ("GN" in every config).
            transformer_in_features: the features the encoder attends over (res3..res5).
            common_stride: stride of the mask features; one FPN level per halving below the
                encoder's finest stride.
        """
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: {missing} are not among "
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES of the backbone {sorted(input_shape)}"
            )
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in ordered]  # res2 .. res5
        self.feature_strides = [v.stride for _, v in ordered]
        self.feature_channels = [v.channels for _, v in ordered]
        enc_shapes = [(k, v) for k, v in ordered if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in enc_shapes]  # res3 .. res5
        self.transformer_feature_strides = [v.stride for _, v in enc_shapes]
        self.transformer_num_feature_levels = len(enc_shapes)

        # coarse to fine: input_proj.0 -> res5, .1 -> res4, .2 -> res3
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(v.channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for _, v in enc_shapes[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # the transformer decoder uses 3 levels
        self.common_stride = common_stride
        self.num_fpn_levels = int(math.log2(min(self.transformer_feature_strides)) - math.log2(common_stride))
        if self.num_fpn_levels < 0:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE={common_stride} is finer than the encoder's finest stride "
                f"{min(self.transformer_feature_strides)} allows"
            )
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias,
                            norm=get_norm(norm, conv_dim), activation=F.relu)
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # coarse to fine, as the top-down pass runs
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "transformer_dim_feedforward": 1024,  # fixed upstream
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
        }

    def encode(self, srcs, pos):
        """Run the encoder on the projected levels (coarse to fine) -> list of ``b x c x h_l x w_l``."""
        y, spatial_shapes = self.transformer(srcs, pos)
        b = y.shape[0]
        levels = y.split([h * w for h, w in spatial_shapes], dim=1)
        return [z.transpose(1, 2).reshape(b, -1, h, w) for z, (h, w) in zip(levels, spatial_shapes)]

    def fpn(self, features, out):
        """Append the FPN levels below the encoder (res2 for stride 4) to ``out``, coarse to fine."""
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            lateral = self.lateral_convs[idx](features[name].float())
            y = lateral + F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.output_convs[idx](y))
        return out

    def forward_features(self, features):
        """See the class docstring."""
        device = features[self.in_features[0]].device
        with autocast_off(device.type):
            srcs, pos = [], []
            for idx, name in enumerate(self.transformer_in_features[::-1]):  # res5, res4, res3
                x = features[name].float()
                srcs.append(self.input_proj[idx](x))
                pos.append(self.pe_layer(x))
            out = self.fpn(features, self.encode(srcs, pos))
            return self.mask_features(out[-1]), out[0], out[: self.maskformer_num_feature_levels]
