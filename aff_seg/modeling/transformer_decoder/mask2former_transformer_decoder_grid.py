"""Mask2Former's masked-attention transformer decoder on dense maps (Cheng et al., CVPR 2022),
with the module and state_dict names of facebookresearch/Mask2Former.

The queries attend to the pixel decoder's res5, res4 and res3 maps in turn (one level per
layer, round robin); each layer's attention mask is the previous prediction's mask logits
bilinearly resized to the level's map, blocked where the probability is below
``attn_mask_threshold`` (0.5).
"""
import torch
from torch.nn import functional as F

from detectron2.layers import Conv2d

from .mask2former_transformer_decoder import TRANSFORMER_DECODER_REGISTRY, MaskedTransformerDecoderBase
from .position_encoding import PositionEmbeddingSine

__all__ = ["MultiScaleMaskedTransformerDecoder"]


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(MaskedTransformerDecoderBase):
    """Upstream Mask2Former's decoder on dense maps (``input_format = "maps"``)."""

    input_format = "maps"

    def make_position_encoding(self, num_pos_feats):
        return PositionEmbeddingSine(num_pos_feats, normalize=True)

    def make_input_proj(self, in_channels, hidden_dim):
        return Conv2d(in_channels, hidden_dim, kernel_size=1)

    def forward(self, x, mask_features):
        """
        Args:
            x: ``num_feature_levels`` maps ``b x c x h_l x w_l`` (res5, res4, res3).
            mask_features: ``b x mask_dim x H/4 x W/4``.
        Returns:
            dict with ``pred_logits`` ``b x Q x (K+1)``, ``pred_masks`` ``b x Q x H/4 x W/4`` and
            ``aux_outputs`` (one such dict per earlier prediction).
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i]).flatten(2).permute(2, 0, 1))  # h*w x b x c
            level = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(level.permute(2, 0, 1))

        b = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)  # Q x b x c
        output = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, level_prob = self.forward_prediction_heads(output, mask_features, size_list[0])
        attn_mask = self.attention_mask(level_prob)
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)  # a query blocked everywhere attends everywhere
            output = self.transformer_cross_attention_layers[i](
                output, src[level_index], memory_mask=attn_mask, pos=pos[level_index], query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, level_prob = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels])
            attn_mask = self.attention_mask(level_prob)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_masks": m} for a, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        """
        Args:
            output: ``Q x b x c``; mask_features: ``b x c x H/4 x W/4``.
            attn_mask_target_size: (h, w) of the level the next layer attends to, or None when
                no layer needs its mask.
        Returns:
            class logits ``b x Q x (K+1)``, mask logits ``b x Q x H/4 x W/4`` and the mask
            probabilities resized to the level ``b x Q x h*w``, detached (None without a size).
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # b x Q x c
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features.to(mask_embed.dtype))
        level_prob = None
        if attn_mask_target_size is not None:
            with torch.no_grad():
                resized = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
                level_prob = resized.sigmoid().flatten(2)
        return outputs_class, outputs_mask, level_prob
