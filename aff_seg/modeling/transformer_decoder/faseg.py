"""FASeg's decoder pieces: dynamic focus-aware positional queries (DFPQ) and high-resolution
cross-attention (HRCA), after Zhang et al., "Dynamic Focus-aware Positional Queries for Semantic
Segmentation", CVPR 2023 (github.com/ziplab/FASeg).  See docs/faseg.md.

* The decoder layers cycle over res5, res4, res3 and, every ``HR_EVERY``-th layer, a
  high-resolution (HR) layer on res2 (``layer_schedule``).
* After each non-HR layer the positional queries become ``g(Q_s + A P)``: the static queries
  ``Q_s`` plus the layer's head-averaged cross-attention ``A`` (``b x Q x n``) applied to the
  keys' position encodings ``P`` (``b x n x c``), through the MLP ``g`` (``adapt_pos2d``).  The
  original forms the ``Q x n x b x c`` broadcast product; here it is one batched matmul.
* Before the first layer ``A`` is the (row-normalised) thresholded mask prediction at res5.
* An HR layer attends, without mask and with the static queries, to the res2 cells of the
  ``max(1, n_5 // OMEGA_RATE)`` res5 cells with the largest cross-attention summed over the
  queries at the last res5 layer.

This file holds the point-cloud variant (AFF tokens; our extension, not in the paper): the
encodings are the decoder's sine encodings and an HR layer reads the 64 res2 tokens nearest to
each chosen res5 token (an 8 x 8 cell of the stride-4 grid) from the mask features.
"""
import torch
from torch import nn

from detectron2.config import configurable

import clusten

from ..point_utils import gather_points
from .mask2former_transformer_decoder import TRANSFORMER_DECODER_REGISTRY, MultiScaleMaskedTransformerDecoder

__all__ = [
    "HR",
    "layer_schedule",
    "faseg_options",
    "positional_queries",
    "pooled_positional_queries",
    "top_cells",
    "MultiScaleMaskedTransformerDecoderFASeg",
]

HR = 3  # schedule entry (and level-embedding row) of the high-resolution level
# res5 stride / res2 stride: an HR cell is CELL x CELL res2 cells
CELL = 8


def layer_schedule(num_layers, hr_every, num_levels=3):
    """Level each decoder layer attends to: the non-HR layers cycle over 0..num_levels-1
    (res5, res4, res3); with ``hr_every`` > 0 every ``hr_every``-th layer is ``HR``.

    13 layers, hr_every 4 -> [0, 1, 2, HR, 0, 1, 2, HR, 0, 1, 2, HR, 0].
    """
    schedule, count = [], 0
    for i in range(num_layers):
        if hr_every > 0 and (i + 1) % hr_every == 0:
            schedule.append(HR)
        else:
            schedule.append(count % num_levels)
            count += 1
    return schedule


def faseg_options(cfg):
    """The ``MODEL.MASK_FORMER.FASEG`` keys as decoder arguments, checked."""
    fa = cfg.MODEL.MASK_FORMER.FASEG
    if fa.OMEGA_RATE < 1:
        raise ValueError(f"MODEL.MASK_FORMER.FASEG.OMEGA_RATE must be >= 1, got {fa.OMEGA_RATE}")
    for key in ("ATTN_MASK_THRESHOLD", "INIT_POOL_THRESHOLD"):
        if not 0.0 < fa[key] < 1.0:
            raise ValueError(f"MODEL.MASK_FORMER.FASEG.{key} must be in (0, 1), got {fa[key]}")
    if fa.HR_EVERY == 1 or fa.HR_EVERY < 0:
        raise ValueError(
            f"MODEL.MASK_FORMER.FASEG.HR_EVERY must be 0 (no high-resolution layer) or >= 2, got {fa.HR_EVERY}")
    return {
        "omega_rate": fa.OMEGA_RATE,
        "attn_mask_threshold": fa.ATTN_MASK_THRESHOLD,
        "init_pool_threshold": fa.INIT_POOL_THRESHOLD,
        "init_pool_complement": fa.INIT_POOL_COMPLEMENT,
        "hr_every": fa.HR_EVERY,
    }


def positional_queries(adapt, static_query, weights, pos):
    """DFPQ: ``g(Q_s + A P)``.

    Args:
        adapt: the MLP g; static_query: ``Q x b x c``.
        weights: ``b x Q x n`` attention weights (or normalised pooling weights).
        pos: ``b x n x c`` position encodings of the keys.
    Returns:
        ``Q x b x c``.
    """
    pooled = torch.bmm(weights, pos.to(weights.dtype))  # b x Q x c
    return adapt(static_query + pooled.transpose(0, 1).to(static_query.dtype))


def pooled_positional_queries(adapt, static_query, level_prob, pos, threshold, complement):
    """The first positional queries: the mean of the res5 encodings where the predicted mask
    probability ``level_prob`` (``b x Q x n``) is below ``threshold`` (``complement``, as the
    original) or at least it, then as ``positional_queries``; an empty set gives the mean 0."""
    region = (level_prob < threshold) if complement else (level_prob >= threshold)
    region = region.to(level_prob.dtype)
    weights = region / (region.sum(-1, keepdim=True) + 1e-6)
    return positional_queries(adapt, static_query, weights, pos)


def top_cells(coarse_weights, omega_rate):
    """Indices ``b x k`` of the ``k = max(1, n // omega_rate)`` res5 cells with the largest
    attention summed over the queries (``coarse_weights`` ``b x Q x n``), best first.

    The original takes ``n // omega_rate`` cells, i.e. none below 32 cells (inputs under about
    180 x 180 px), where its HR layer attends to an empty set; here at least one.
    """
    scores = coarse_weights.sum(1)  # b x n
    k = max(1, scores.shape[1] // omega_rate)
    return scores.topk(k, dim=1).indices


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderFASeg(MultiScaleMaskedTransformerDecoder):
    """FASeg's decoder on token point clouds (AFF): DFPQ and HRCA on the point-cloud
    Mask2Former decoder (see the module docstring).

    Keys: the parent's, with ``level_embed`` of 4 rows when there are HR layers (the 4th for
    res2), plus ``adapt_pos2d.{0,2}`` (g).  HR layers read the mask features, so
    ``SEM_SEG_HEAD.MASK_DIM`` must equal ``MASK_FORMER.HIDDEN_DIM``.
    """

    @configurable
    def __init__(
        self,
        in_channels,
        mask_classification=True,
        *,
        omega_rate: int,
        attn_mask_threshold: float,
        init_pool_threshold: float,
        init_pool_complement: bool,
        hr_every: int,
        **kwargs,
    ):
        """
        Args:
            in_channels, mask_classification, kwargs: as ``MultiScaleMaskedTransformerDecoder``.
            omega_rate, attn_mask_threshold, init_pool_threshold, init_pool_complement, hr_every:
                ``MODEL.MASK_FORMER.FASEG.*`` (see ``aff_seg/config.py``).
        """
        super().__init__(in_channels, mask_classification, **kwargs)
        hidden_dim = self.query_feat.weight.shape[1]
        if hr_every and kwargs["mask_dim"] != hidden_dim:
            raise ValueError(
                f"FASeg's high-resolution layers attend to the mask features: MODEL.SEM_SEG_HEAD.MASK_DIM "
                f"({kwargs['mask_dim']}) must equal MODEL.MASK_FORMER.HIDDEN_DIM ({hidden_dim}), or set "
                "MODEL.MASK_FORMER.FASEG.HR_EVERY 0"
            )
        self.omega_rate = omega_rate
        self.attn_mask_threshold = attn_mask_threshold
        self.init_pool_threshold = init_pool_threshold
        self.init_pool_complement = init_pool_complement
        self.schedule = layer_schedule(self.num_layers, hr_every, self.num_feature_levels)
        if HR in self.schedule:
            self.level_embed = nn.Embedding(self.num_feature_levels + 1, hidden_dim)
        self.adapt_pos2d = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        return {**super().from_config(cfg, in_channels, mask_classification), **faseg_options(cfg)}

    def forward(self, x, pos, mask_features, mf_pos, mask=None):
        """As ``MultiScaleMaskedTransformerDecoder.forward`` (same inputs and outputs)."""
        del mask
        canvas_hw = self._canvas_size(mf_pos)
        src, pos_emb = self._sources(x, pos)
        level_neighbours = self._level_neighbours(pos, mf_pos)
        b = src[0].shape[1]
        static_query = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)  # Q x b x c
        output = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, level_prob = self.forward_prediction_heads(
            output, mask_features, mf_pos, level_neighbours[0], canvas_hw)
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        attn_mask = self.attention_mask(level_prob)
        query_pos = pooled_positional_queries(self.adapt_pos2d, static_query, level_prob, pos_emb[0].transpose(0, 1),
                                              self.init_pool_threshold, self.init_pool_complement)
        if HR in self.schedule:
            hr_src = mask_features + self.level_embed.weight[HR].to(mask_features.dtype)  # b x n_2 x c
            hr_pos = self.pe_layer(mf_pos)

        coarse = None
        for i, level in enumerate(self.schedule):
            layer = self.transformer_cross_attention_layers[i]
            if level == HR:
                memory, memory_pos = self._high_resolution_memory(coarse, pos[0], mf_pos, hr_src, hr_pos)
                output = layer.attend(output, memory, None, memory_pos, static_query, need_weights=False)[0]
            else:
                # a query whose mask blocks every token attends to all of them
                attn_mask[attn_mask.all(-1)] = False
                output, weights = layer.attend(output, src[level], attn_mask, pos_emb[level], query_pos)
                if level == 0:
                    coarse = weights
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)

            following = self.schedule[i + 1] if i + 1 < self.num_layers else HR
            outputs_class, outputs_mask, level_prob = self.forward_prediction_heads(
                output, mask_features, mf_pos, None if following == HR else level_neighbours[following],
                canvas_hw)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
            if level_prob is not None:
                attn_mask = self.attention_mask(level_prob)
            if level != HR:
                query_pos = positional_queries(self.adapt_pos2d, static_query, weights, pos_emb[level].transpose(0, 1))

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_masks": m} for a, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }

    def _high_resolution_memory(self, coarse, pos5, mf_pos, hr_src, hr_pos):
        """Keys/values of an HR layer: for each top res5 token (``top_cells``), its ``CELL**2``
        nearest res2 tokens, in score order.

        Args:
            coarse: ``b x Q x n_5`` attention of the last res5 layer; pos5: ``b x n_5 x 2``.
            mf_pos: ``b x n_2 x 2``; hr_src, hr_pos: ``b x n_2 x c`` res2 features and encodings.
        Returns:
            memory and its position encodings, ``(k * CELL**2) x b x c`` each.
        """
        top = top_cells(coarse, self.omega_rate)  # b x k
        centres = gather_points(pos5.float(), top.unsqueeze(-1)).squeeze(2)  # b x k x 2
        idx = clusten.knn(centres, mf_pos.float(), min(CELL * CELL, mf_pos.shape[1])).flatten(1)  # b x k*64
        index = idx.unsqueeze(-1).expand(-1, -1, hr_src.shape[-1])
        memory = torch.gather(hr_src, 1, index).transpose(0, 1)
        memory_pos = torch.gather(hr_pos, 1, index).transpose(0, 1)
        return memory, memory_pos
