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

This file holds the shared pieces (``FASegDecoderMixin``: options, schedule, the decoder layers)
and the grid decoder (the original's, with its key names:
its released checkpoints load); ``faseg_pc`` the point-cloud variant on AFF tokens.
"""
import torch
from torch import nn

from detectron2.config import configurable

from .mask2former_transformer_decoder import TRANSFORMER_DECODER_REGISTRY
from .mask2former_transformer_decoder_grid import MultiScaleMaskedTransformerDecoder

__all__ = [
    "HR",
    "layer_schedule",
    "faseg_options",
    "positional_queries",
    "pooled_positional_queries",
    "top_cells",
    "windows",
    "FASegDecoderMixin",
    "MultiScaleMaskedTransformerDecoderFASeg",
]

HR = 3  # schedule entry (and level-embedding row) of the high-resolution level


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
    k = torch.sym_max(1, scores.shape[1] // omega_rate)  # stays symbolic in an exported graph
    return scores.topk(k, dim=1).indices


def windows(fine, coarse_hw):
    """Split a map into the cells of a coarser grid, in row-major cell order.

    Args:
        fine: ``b x c x H x W`` (the 1/4 map); coarse_hw: (h, w) of the coarse (1/32) grid,
            ``H = r h`` and ``W = r w`` for an integer r (8 with ``SIZE_DIVISIBILITY`` 32).
    Returns:
        ``b x (h w) x r^2 x c``, the cell's pixels row-major.
    """
    b, c, H, W = fine.shape
    h, w = coarse_hw
    r = H // h
    if r * h != H or r * w != W:
        raise ValueError(
            f"FASeg's high-resolution layers need the 1/4 map ({H} x {W}) to be an exact multiple of the 1/32 "
            f"map ({h} x {w}); pad the input to a multiple of 32 (MODEL.MASK_FORMER.SIZE_DIVISIBILITY)"
        )
    return fine.view(b, c, h, r, w, r).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, r * r, c)


class FASegDecoderMixin:
    """What FASeg's grid and point-cloud decoders share, placed before the Mask2Former decoder
    in the bases: the ``MODEL.MASK_FORMER.FASEG`` options, the layer schedule, DFPQ's MLP g
    (``adapt_pos2d``) and the decoder layers with DFPQ and HRCA (``decode``)."""

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
            in_channels, mask_classification, kwargs: as the Mask2Former decoder.
            omega_rate, attn_mask_threshold, init_pool_threshold, init_pool_complement, hr_every:
                ``MODEL.MASK_FORMER.FASEG.*`` (see ``aff_seg/config.py``).
        """
        super().__init__(in_channels, mask_classification, **kwargs)
        hidden_dim = self.query_feat.weight.shape[1]
        self.omega_rate = omega_rate
        self.attn_mask_threshold = attn_mask_threshold
        self.init_pool_threshold = init_pool_threshold
        self.init_pool_complement = init_pool_complement
        self.schedule = layer_schedule(self.num_layers, hr_every)
        if HR in self.schedule:
            self.add_high_resolution_level(hidden_dim, kwargs["mask_dim"])
        self.adapt_pos2d = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        return {**super().from_config(cfg, in_channels, mask_classification), **faseg_options(cfg)}

    def add_high_resolution_level(self, hidden_dim, mask_dim):
        """What the HR layers need beyond the Mask2Former decoder's modules (nothing here)."""

    def decode(self, src, pos, predict, high_resolution):
        """The decoder layers of the schedule, with DFPQ and HRCA.

        Args:
            src, pos: the res5, res4, res3 keys and their position encodings, ``n_l x b x c`` each.
            predict: ``predict(output, level)`` -> class logits, mask logits and the mask
                probabilities for the attention mask at ``level`` (None: not needed).
            high_resolution: called once before the layers when the schedule has HR layers; returns
                ``memory(coarse)`` -> an HR layer's memory and its encodings, ``m x b x c`` each, from the
                last res5 layer's attention ``coarse`` ``b x Q x n_5``.
        Returns:
            dict with ``pred_logits``, ``pred_masks`` and ``aux_outputs`` (one such dict per
            earlier prediction: 1 + the number of layers).
        """
        b = src[0].shape[1]
        static_query = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)  # Q x b x c
        output = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, level_prob = predict(output, 0)
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        attn_mask = self.attention_mask(level_prob)
        query_pos = pooled_positional_queries(self.adapt_pos2d, static_query, level_prob, pos[0].transpose(0, 1),
                                              self.init_pool_threshold, self.init_pool_complement)
        high_resolution_memory = high_resolution() if HR in self.schedule else None
        coarse = None
        for i, level in enumerate(self.schedule):
            layer = self.transformer_cross_attention_layers[i]
            if level == HR:
                memory, memory_pos = high_resolution_memory(coarse)
                output = layer.attend(output, memory, None, memory_pos, static_query, need_weights=False)[0]
            else:
                # a query whose mask blocks every key attends to all of them
                attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
                output, weights = layer.attend(output, src[level], attn_mask, pos[level], query_pos)
                if level == 0:
                    coarse = weights
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)

            # the next layer's mask (an HR layer has none; the original computes it anyway)
            following = self.schedule[i + 1] if i + 1 < self.num_layers else HR
            outputs_class, outputs_mask, level_prob = predict(output, None if following == HR else following)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
            if level_prob is not None:
                attn_mask = self.attention_mask(level_prob)
            if level != HR:
                query_pos = positional_queries(self.adapt_pos2d, static_query, weights, pos[level].transpose(0, 1))

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_masks": m} for a, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderFASeg(FASegDecoderMixin, MultiScaleMaskedTransformerDecoder):
    """FASeg's decoder on dense maps (``input_format = "maps"``; a token backbone gets
    ``MultiScaleMaskedTransformerDecoderFASegPc``).

    Four levels (res5, res4, res3 and the 1/4 map for the HR layers), the position encodings
    from the pixel decoder, the layer schedule, DFPQ and HRCA of the module docstring.  Keys:
    upstream's with ``level_embed`` of 4 rows, plus ``adapt_pos2d.{0,2}`` (g).  ``PRE_NORM`` works
    (the original crashes with it).  Arguments: ``FASegDecoderMixin``'s.
    """

    num_feature_levels = 4

    def make_position_encoding(self, num_pos_feats):
        return None  # the encodings come from the pixel decoder

    def forward(self, x, mask_features, pos_list=None):
        """
        Args:
            x: 4 maps ``b x c x h_l x w_l`` (res5, res4, res3, res2).
            mask_features: ``b x mask_dim x H/4 x W/4``.
            pos_list: the 4 levels' position encodings, shaped as ``x``.
        Returns:
            dict with ``pred_logits`` ``b x Q x (K+1)``, ``pred_masks`` ``b x Q x H/4 x W/4`` and
            ``aux_outputs`` (one such dict per earlier prediction: 1 + the number of layers).
        """
        if len(x) != self.num_feature_levels or pos_list is None or len(pos_list) != self.num_feature_levels:
            raise ValueError(
                f"{type(self).__name__} needs {self.num_feature_levels} feature maps and their position encodings "
                "(MODEL.SEM_SEG_HEAD.NAME 'MaskFormerHeadFASeg', PIXEL_DECODER_NAME 'MSDeformAttnPixelDecoder4ScalesFASeg')"
            )
        size_list = [tuple(level.shape[-2:]) for level in x]
        src, pos = [], []
        for i in range(HR):  # res5, res4, res3: n_l x b x c
            src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
            pos.append(pos_list[i].flatten(2).permute(2, 0, 1))

        def predict(output, level):
            return self.forward_prediction_heads(output, mask_features, None if level is None else size_list[level])

        def high_resolution():
            fine = self.input_proj[HR](x[HR]) + self.level_embed.weight[HR][None, :, None, None]
            hr_src = windows(fine, size_list[0])  # b x n_5 x r^2 x c
            hr_pos = windows(pos_list[HR], size_list[0])

            def memory(coarse):
                top = top_cells(coarse, self.omega_rate)  # b x k
                return self._gather_windows(hr_src, top), self._gather_windows(hr_pos, top)
            return memory

        return self.decode(src, pos, predict, high_resolution)

    @staticmethod
    def _gather_windows(cells, top):
        """``b x n_5 x r^2 x c`` cells, ``b x k`` chosen cells -> ``(k r^2) x b x c`` (score order)."""
        b, _, r2, c = cells.shape
        chosen = torch.gather(cells, 1, top[:, :, None, None].expand(-1, -1, r2, c))
        return chosen.reshape(b, -1, c).transpose(0, 1)
