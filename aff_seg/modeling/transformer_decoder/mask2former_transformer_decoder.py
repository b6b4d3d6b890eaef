"""Mask2Former's masked-attention transformer decoder: the modules both variants share and the
variant on token point clouds (the grid variant is in ``mask2former_transformer_decoder_grid``).

Differences from upstream (9b0651c), all needed to load the AFF checkpoints:
* sources are token lists ``b x n_l x c`` with positions, not feature maps; ``input_proj`` is a
  Linear (empty when the widths match, so the checkpoint keys are unchanged);
* mask logits are predicted on the res2 tokens and scattered onto the dense stride-4 canvas,
  so ``pred_masks`` (and every auxiliary output) is ``b x Q x h x w`` as upstream;
* the attention mask of a level is the res2 mask logits Shepard-interpolated (k=4, d^-6) at
  the level's token positions, i.e. point-sampled instead of bilinearly pooled.
"""
import logging

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils.registry import Registry

from ..point_utils import autocast_off, over_token_chunks, points_to_canvas, shepard_interpolate, shepard_neighbours
from ..variants import resolve_variant
from .position_encoding import PointPositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MaskedTransformerDecoderBase",
    "MultiScaleMaskedTransformerDecoderPc",
]

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = "Registry for the transformer decoder (predictor) of MaskFormer."

# masked attention: res2 mask logits interpolated at a level's tokens from the 4 nearest res2
# tokens with weights ~ d^-6 (an exact copy where a token is a res2 token, i.e. always)
MASK_SHEPARD_K = 4
MASK_SHEPARD_POWER = 3.0


def build_transformer_decoder(cfg, in_channels, mask_classification=True):
    """Build the decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``, the grid or
    point-cloud variant as the backbone returns (:mod:`aff_seg.modeling.variants`)."""
    key = "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"
    decoder = resolve_variant(TRANSFORMER_DECODER_REGISTRY, key, cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME, cfg)
    return decoder(cfg, in_channels, mask_classification)


def _xavier_init(module):
    """Xavier-uniform init of every matrix of ``module`` (the decoder layers' init)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Query self-attention (post-norm unless ``normalize_before``)."""

    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt, query_pos):
        """tgt, query_pos: ``Q x b x c``."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = x + query_pos
        tgt = tgt + self.dropout(self.self_attn(q, k, value=x)[0])
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from the queries to one level's tokens."""

    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        """tgt, query_pos: ``Q x b x c``; memory, pos: ``n x b x c``; memory_mask: ``b*heads x Q x n`` bool
        (or ``Q x n`` for one image: the same for every head)."""
        return self.attend(tgt, memory, memory_mask, pos, query_pos, need_weights=False)[0]

    def attend(self, tgt, memory, memory_mask, pos, query_pos, need_weights=True):
        """``forward`` that also returns the attention weights ``b x Q x n`` averaged over the
        heads (None unless ``need_weights``; FASeg's positional queries are built from them)."""
        x = self.norm(tgt) if self.normalize_before else tgt
        out, weights = self.multihead_attn(query=x + query_pos, key=memory + pos, value=memory,
                                           attn_mask=memory_mask, need_weights=need_weights)
        tgt = tgt + self.dropout(out)
        return (tgt if self.normalize_before else self.norm(tgt)), weights


class FFNLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, normalize_before=False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskedTransformerDecoderBase(nn.Module):
    """Modules and config of Mask2Former's masked-attention decoder, shared by the grid
    (``MultiScaleMaskedTransformerDecoder``) and point-cloud (``MultiScaleMaskedTransformerDecoderPc``)
    variants; they differ in ``make_position_encoding``, ``make_input_proj`` and ``forward``."""

    _version = 2
    num_feature_levels = 3  # res5, res4, res3, round robin (a subclass may use more)
    # a query attends where its predicted mask probability reaches this
    attn_mask_threshold = 0.5

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # upstream's version-1 checkpoints named query_feat "static_query"
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            renamed = False
            for k in list(state_dict.keys()):
                if k.startswith(prefix) and "static_query" in k:
                    state_dict[k.replace("static_query", "query_feat")] = state_dict.pop(k)
                    renamed = True
            if renamed:
                logging.getLogger(__name__).warning(
                    f"{self.__class__.__name__}: renamed old 'static_query' weights to 'query_feat'"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @configurable
    def __init__(
        self,
        in_channels,
        mask_classification=True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels: width of the pixel decoder's multi-scale features.
            mask_classification: must be True (Mask2Former classifies masks).
            num_classes: K; the classifier predicts K + 1 (the last is "no object").
            hidden_dim, num_queries, nheads, dim_feedforward, pre_norm: transformer settings.
            dec_layers: number of decoder layers (``MASK_FORMER.DEC_LAYERS - 1``).
            mask_dim: width of the mask features.
            enforce_input_project: add a Linear input projection even when
                ``in_channels == hidden_dim``.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError(f"{type(self).__name__} only supports mask_classification=True")
        self.pe_layer = self.make_position_encoding(hidden_dim // 2)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm))
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm))
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward, dropout=0.0, normalize_before=pre_norm))
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions

        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(self.make_input_proj(in_channels, hidden_dim))
                weight_init.c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # one prediction comes from the learnable queries themselves, hence the -1
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        }

    def attention_mask(self, level_prob):
        """``b x Q x n_l`` mask probabilities -> bool attention mask, True = blocked (probability
        below ``attn_mask_threshold``): ``b*heads x Q x n_l``, or ``Q x n_l`` for one image, which
        ``nn.MultiheadAttention`` applies to every head (the same attention with 1/heads of the
        memory for the mask and the float copy it makes of it)."""
        blocked = level_prob < self.attn_mask_threshold
        if blocked.shape[0] == 1:
            return blocked[0]
        return blocked.repeat_interleave(self.num_heads, dim=0)

    def make_position_encoding(self, num_pos_feats):
        raise NotImplementedError

    def make_input_proj(self, in_channels, hidden_dim):
        raise NotImplementedError


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderPc(MaskedTransformerDecoderBase):
    """AFF's decoder on token point clouds (``input_format = "tokens"``)."""

    input_format = "tokens"

    def make_position_encoding(self, num_pos_feats):
        return PointPositionEmbeddingSine(num_pos_feats)

    def make_input_proj(self, in_channels, hidden_dim):
        return nn.Linear(in_channels, hidden_dim)

    def forward(self, x, pos, mask_features, mf_pos, canvas_hw):
        """
        Args:
            x: list of 3 ``b x n_l x c`` level features (res5, res4, res3).
            pos: list of 3 ``b x n_l x 2`` level positions.
            mask_features: ``b x n x mask_dim`` on the res2 tokens (all h*w grid pixels).
            mf_pos: ``b x n x 2`` res2 positions.
            canvas_hw: (h, w) of the stride-4 grid the res2 tokens tile (the backbone's
                ``res2_spatial_shape``).
        Returns:
            dict with ``pred_logits`` ``b x Q x (K+1)``, ``pred_masks`` ``b x Q x h x w`` and
            ``aux_outputs`` (in training, one such dict per earlier prediction; empty in eval).
        """
        self._check_canvas(canvas_hw, mf_pos)
        src, pos_emb = self._sources(x, pos)
        level_neighbours = self._level_neighbours(pos, mf_pos, canvas_hw)
        b = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)  # Q x b x c
        output = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)

        predictions_class, predictions_mask = [], []
        # in inference only the last prediction's dense masks are used (aux_outputs feed the
        # training losses): the others skip the b x Q x h x w canvas
        outputs_class, outputs_mask, level_prob = self.forward_prediction_heads(
            output, mask_features, mf_pos, level_neighbours[0], canvas_hw, self.training or self.num_layers == 0)
        attn_mask = self.attention_mask(level_prob)
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            # a query whose mask blocks every token attends to all of them
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](
                output, src[level_index], memory_mask=attn_mask, pos=pos_emb[level_index], query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, level_prob = self.forward_prediction_heads(
                output, mask_features, mf_pos, level_neighbours[(i + 1) % self.num_feature_levels], canvas_hw,
                self.training or i == self.num_layers - 1)
            attn_mask = self.attention_mask(level_prob)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_masks": m} for a, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ] if self.training else [],
        }

    def _sources(self, x, pos):
        """The levels' keys/values ``n_l x b x c`` (projected, plus the level embedding) and their
        sine position encodings ``n_l x b x c``, for the ``num_feature_levels`` inputs."""
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        src, pos_emb = [], []
        for i in range(self.num_feature_levels):
            pos_emb.append(self.pe_layer(pos[i]).transpose(0, 1))
            src.append((self.input_proj[i](x[i]) + self.level_embed.weight[i][None, None, :]).transpose(0, 1))
        return src, pos_emb

    @staticmethod
    @torch.no_grad()
    def _level_neighbours(pos, mf_pos, canvas_hw):
        """Each level's attention masks are read off the res2 mask logits at the level's tokens:
        one neighbour search per level (``shepard_neighbours``; the res2 tokens are the pixels
        of the ``canvas_hw`` grid), shared by every layer that attends to that level."""
        return [shepard_neighbours(p.float(), mf_pos.float(), k=MASK_SHEPARD_K, power=MASK_SHEPARD_POWER,
                                   grid_hw=canvas_hw) for p in pos]

    @staticmethod
    def _check_canvas(canvas_hw, mf_pos):
        """The res2 tokens must tile the (h, w) canvas: one token per grid pixel."""
        h, w = canvas_hw
        if h * w != mf_pos.shape[1]:
            raise ValueError(
                f"the mask-feature tokens must cover the stride-4 grid exactly: {mf_pos.shape[1]} tokens "
                f"for a {h} x {w} canvas"
            )

    def forward_prediction_heads(self, output, mask_features, mf_pos, target_neighbours, canvas_hw, with_canvas=True):
        """
        Args:
            output: ``Q x b x c`` query features; mask_features: ``b x n x c``; mf_pos: ``b x n x 2``.
            target_neighbours: ``shepard_neighbours(level positions, mf_pos)`` of the level the
                next layer attends to (``b x n_l x k`` indices and weights), or None when no
                layer needs it.
            canvas_hw: (h, w) of the stride-4 canvas.
            with_canvas: scatter the mask logits onto the canvas (else None is returned for them).
        Returns:
            class logits ``b x Q x (K+1)``, dense mask logits ``b x Q x h x w`` and the mask
            probabilities at the level's tokens ``b x Q x n_l`` float32, detached (None when
            ``target_neighbours`` is None).
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # b x Q x c
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        # b x n x Q; in inference a chunk of tokens at a time into one n-major table, which the
        # level interpolation then reads without a b x n x Q copy (0.4 GB each at 4096 x 4096)
        token_masks = over_token_chunks(
            lambda mf: (mask_embed @ mf.transpose(1, 2).to(mask_embed.dtype)).transpose(1, 2),
            mask_features.shape[1], mask_features)
        level_prob = None
        if target_neighbours is not None:
            with torch.no_grad(), autocast_off(token_masks.device.type):
                level_masks = shepard_interpolate(token_masks.float(), target_neighbours)  # b x n_l x Q
                level_prob = level_masks.transpose(1, 2).sigmoid()
        outputs_mask = points_to_canvas(token_masks, mf_pos, *canvas_hw) if with_canvas else None
        return outputs_class, outputs_mask, level_prob  # masks: b x Q x h x w
