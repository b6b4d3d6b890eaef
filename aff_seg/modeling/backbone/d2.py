"""The detectron2 backbone ``AutoFocusFormer``: the plain ``AFF`` core built from ``cfg.MODEL.AFF.*``."""
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY

from .aff import AFF
from .base import OUT_FEATURES, StagesBackbone, check_out_features

__all__ = ["AutoFocusFormer"]


@BACKBONE_REGISTRY.register()
class AutoFocusFormer(AFF, StagesBackbone):
    """AFF registered under the original's name; ``output_shape`` gives res2..res5 with the
    stage dims as channels and nominal strides 4, 8, 16, 32 (the tokens are not on a grid:
    each output also carries ``res{i}_pos`` and ``res{i}_spatial_shape``)."""

    output_format = "tokens"  # the heads take their point-cloud variants (aff_seg.modeling.variants)

    @configurable
    def __init__(self, *, out_features=OUT_FEATURES, **aff_kwargs):
        super().__init__(out_indices=check_out_features(out_features, "MODEL.AFF.OUT_FEATURES"), **aff_kwargs)
        self._set_outputs(out_features, self.num_features)

    @classmethod
    def from_config(cls, cfg, input_shape):
        aff = cfg.MODEL.AFF
        return dict(
            in_chans=input_shape.channels,
            embed_dim=list(aff.EMBED_DIM),
            depths=list(aff.DEPTHS),
            num_heads=list(aff.NUM_HEADS),
            mlp_ratio=aff.MLP_RATIO,
            cluster_size=aff.CLUSTER_SIZE,
            nbhd_size=list(aff.NBHD_SIZE),
            layer_scale=aff.LAYER_SCALE,
            alpha=aff.ALPHA,
            ds_rate=aff.DS_RATE,
            reserve_on=aff.RESERVE,
            drop_rate=aff.DROP_RATE,
            attn_drop_rate=aff.ATTN_DROP_RATE,
            drop_path_rate=aff.DROP_PATH_RATE,
            patch_norm=aff.PATCH_NORM,
            stem_norm=aff.STEM_NORM,
            out_features=list(aff.OUT_FEATURES),
            fused_attention=aff.FUSED_ATTENTION,
        )
