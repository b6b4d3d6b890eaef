"""MaskFormerHead: the pixel decoder followed by the transformer decoder, both on dense maps (grid
Mask2Former) or both on tokens (AFF), as the backbone returns (:mod:`aff_seg.modeling.variants`)."""
from typing import Dict

from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..pixel_decoder.msdeformattn_pc import build_pixel_decoder
from ..transformer_decoder.mask2former_transformer_decoder import build_transformer_decoder
from ..variants import backbone_output_format

__all__ = ["MaskFormerHead", "MaskFormerHeadFASeg"]


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """``sem_seg_head`` of the MaskFormer meta-architecture (keys ``pixel_decoder.*`` and
    ``predictor.*``, as in the official checkpoints)."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
        output_format: str = "maps",
    ):
        """
        Args:
            input_shape: the backbone outputs this head reads.
            num_classes: K.
            pixel_decoder: module with ``forward_features``: the 3-tuple of
                ``MSDeformAttnPixelDecoder`` (maps) or the 5-tuple of ``MSDeformAttnPixelDecoderPc``
                (tokens).
            transformer_predictor: the transformer decoder.
            transformer_in_feature: must be "multi_scale_pixel_decoder" (the only mode the
                pixel decoders support).
            output_format: what the backbone returns, "maps" or "tokens" (the decoders' variant).
        """
        super().__init__()
        if transformer_in_feature != "multi_scale_pixel_decoder":
            raise ValueError(
                "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE must be 'multi_scale_pixel_decoder' (the only mode "
                f"of the pixel decoders here), got {transformer_in_feature!r}"
            )
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.num_classes = num_classes
        self.output_format = output_format

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "transformer_in_feature": cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE,
            "transformer_predictor": build_transformer_decoder(cfg, head.CONVS_DIM, mask_classification=True),
            "output_format": backbone_output_format(cfg),
        }

    def forward(self, features, release_features=False):
        """features: the backbone's dict -> the transformer decoder's prediction dict.

        ``release_features``: the caller gives ``features`` up; the token pixel decoder removes
        each feature tensor from it once read (freed early: bounded memory for large images).
        """
        return self.layers(features, release_features)

    def layers(self, features, release_features=False):
        if self.output_format == "tokens":
            mask_features, mf_pos, _, multi_scale_features, multi_scale_poss = self.pixel_decoder.forward_features(
                features, release_features=release_features)
            canvas_hw = features[self.in_features[0] + "_spatial_shape"]
            return self.predictor(multi_scale_features, multi_scale_poss, mask_features, mf_pos, canvas_hw)
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features)


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHeadFASeg(MaskFormerHead):
    """FASeg's head on dense maps (docs/faseg.md): its pixel decoder also returns the four levels'
    learned position encodings, which the decoder turns into positional queries.  The same keys
    as ``MaskFormerHead``.  (On a token backbone, FASeg's decoder runs under ``MaskFormerHead``.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.output_format != "maps":
            raise ValueError(
                "MODEL.SEM_SEG_HEAD.NAME='MaskFormerHeadFASeg' reads dense maps but MODEL.BACKBONE.NAME returns "
                "tokens: use MaskFormerHead with MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME="
                "'MultiScaleMaskedTransformerDecoderFASeg' (the point-cloud variant)"
            )

    def layers(self, features, release_features=False):  # (dense maps: nothing is released)
        mask_features, _, multi_scale_features, pos = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features, pos)
