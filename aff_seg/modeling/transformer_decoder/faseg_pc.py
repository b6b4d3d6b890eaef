"""FASeg's decoder on token point clouds (AFF): our extension, not in the paper (docs/faseg.md).

The dynamic positional queries are built from the decoder's sine encodings of the token
positions; a high-resolution layer reads, for each chosen res5 token, the ``CELL**2`` res2 tokens
nearest to it (the tokens are irregular: an 8 x 8 cell of the stride-4 grid when they are dense)
from the mask features.
"""
import torch
from torch import nn

from detectron2.config import configurable

import clusten

from ..point_utils import gather_points
from .faseg import HR, faseg_options, layer_schedule, pooled_positional_queries, positional_queries, top_cells
from .mask2former_transformer_decoder import TRANSFORMER_DECODER_REGISTRY, MultiScaleMaskedTransformerDecoderPc

__all__ = ["MultiScaleMaskedTransformerDecoderFASegPc"]

# res5 stride / res2 stride: an HR cell is CELL x CELL res2 cells
CELL = 8


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderFASegPc(MultiScaleMaskedTransformerDecoderPc):
    """FASeg's decoder on token point clouds (AFF): DFPQ and HRCA on the point-cloud
    Mask2Former decoder (see the module docstring).

    Keys: the parent's, with ``level_embed`` of 4 rows when there are HR layers (the 4th for
    res2), plus ``adapt_pos2d.{0,2}`` (g).  HR layers read the mask features, so
    ``SEM_SEG_HEAD.MASK_DIM`` must equal ``MASK_FORMER.HIDDEN_DIM``.  A config names it
    ``MultiScaleMaskedTransformerDecoderFASeg`` (:mod:`aff_seg.modeling.variants`).
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
            in_channels, mask_classification, kwargs: as ``MultiScaleMaskedTransformerDecoderPc``.
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

    def forward(self, x, pos, mask_features, mf_pos, canvas_hw):
        """As ``MultiScaleMaskedTransformerDecoderPc.forward`` (same inputs and outputs)."""
        self._check_canvas(canvas_hw, mf_pos)
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
                attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
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
