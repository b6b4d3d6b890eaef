"""FASeg's decoder on token point clouds (AFF): our extension, not in the paper (docs/faseg.md).

The dynamic positional queries are built from the decoder's sine encodings of the token
positions; a high-resolution layer reads, for each chosen res5 token, the ``CELL**2`` res2 tokens
nearest to it (the tokens are irregular: an 8 x 8 cell of the stride-4 grid when they are dense)
from the mask features.
"""
import torch
from torch import nn


import clusten

from ..point_utils import gather_points
from .faseg import HR, FASegDecoderMixin, top_cells
from .mask2former_transformer_decoder import TRANSFORMER_DECODER_REGISTRY, MultiScaleMaskedTransformerDecoderPc

__all__ = ["MultiScaleMaskedTransformerDecoderFASegPc"]

# res5 stride / res2 stride: an HR cell is CELL x CELL res2 cells
CELL = 8


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderFASegPc(FASegDecoderMixin, MultiScaleMaskedTransformerDecoderPc):
    """FASeg's decoder on token point clouds (AFF): DFPQ and HRCA on the point-cloud
    Mask2Former decoder (see the module docstring).

    Keys: the parent's, with ``level_embed`` of 4 rows when there are HR layers (the 4th for
    res2), plus ``adapt_pos2d.{0,2}`` (g).  HR layers read the mask features, so
    ``SEM_SEG_HEAD.MASK_DIM`` must equal ``MASK_FORMER.HIDDEN_DIM``.  A config names it
    ``MultiScaleMaskedTransformerDecoderFASeg`` (:mod:`aff_seg.modeling.variants`).  Arguments:
    ``FASegDecoderMixin``'s.
    """

    def add_high_resolution_level(self, hidden_dim, mask_dim):
        if mask_dim != hidden_dim:
            raise ValueError(
                f"FASeg's high-resolution layers attend to the mask features: MODEL.SEM_SEG_HEAD.MASK_DIM "
                f"({mask_dim}) must equal MODEL.MASK_FORMER.HIDDEN_DIM ({hidden_dim}), or set "
                "MODEL.MASK_FORMER.FASEG.HR_EVERY 0"
            )
        self.level_embed = nn.Embedding(self.num_feature_levels + 1, hidden_dim)

    def forward(self, x, pos, mask_features, mf_pos, canvas_hw):
        """As ``MultiScaleMaskedTransformerDecoderPc.forward`` (same inputs and outputs)."""
        self._check_canvas(canvas_hw, mf_pos)
        src, pos_emb = self._sources(x, pos)
        level_neighbours = self._level_neighbours(pos, mf_pos, canvas_hw)

        def predict(output, level):
            neighbours = None if level is None else level_neighbours[level]
            return self.forward_prediction_heads(output, mask_features, mf_pos, neighbours, canvas_hw)

        def high_resolution():
            hr_src = mask_features + self.level_embed.weight[HR].to(mask_features.dtype)  # b x n_2 x c
            hr_pos = self.pe_layer(mf_pos)
            return lambda coarse: self._high_resolution_memory(coarse, pos[0], mf_pos, hr_src, hr_pos)

        return self.decode(src, pos_emb, predict, high_resolution)

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
