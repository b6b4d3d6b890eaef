"""Dense-map backbones as token backbones: ``grid_tokens`` (a map as tokens with positions),
``MapsAsTokens`` (a mixin that hands a dense-map backbone's outputs on in the AFF backbone's
output format) and the R50 baseline ``D2ResNetTokens`` (detectron2's ResNet through it).

So the point-cloud pixel decoder and transformer decoder can run on grid tokens and adaptive
(AFF) tokens alike, and the two can be compared in one harness.
"""
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..point_utils import grid_positions

__all__ = ["D2ResNetTokens", "MapsAsTokens", "grid_tokens"]

_GRID_STRIDE = 4  # positions are in units of the stride-4 grid (docs/aff.md, Coordinates)


def grid_tokens(feature, stride):
    """A dense feature map as tokens with their positions.

    Args:
        feature: ``b x C x h_s x w_s`` map of stride ``stride`` (a multiple of 4).
        stride: the map's stride in input pixels.
    Returns:
        (tokens ``b x (h_s*w_s) x C`` in row-major order, positions ``b x (h_s*w_s) x 2``
        (x, y) in stride-4 grid units: the centre of each cell, so a stride-8 cell over
        stride-4 cells 2c and 2c+1 sits at 2c + 0.5; stride-4 cells sit on integers).
    """
    if stride % _GRID_STRIDE:
        raise ValueError(f"stride must be a multiple of {_GRID_STRIDE}, got {stride}")
    b, c, h, w = feature.shape
    scale = stride // _GRID_STRIDE
    pos = (grid_positions(h, w, b, feature.device) * scale + (scale - 1) / 2).to(feature.dtype)
    return feature.flatten(2).transpose(1, 2), pos


class MapsAsTokens:
    """Mixin for a detectron2 ``Backbone`` with dense outputs ``res{i}`` (``b x C_i x h_i x w_i``,
    strides in ``_out_feature_strides``): ``forward`` returns each as tokens ``b x n_i x C_i``
    with ``res{i}_pos`` (``b x n_i x 2``) and ``res{i}_spatial_shape`` (the stride-4 grid's
    (h, w), the same for every level), as the AFF backbone returns them.

    The maps come from ``dense_maps(x)``: by default the ``forward`` of the backbone class listed
    after this mixin (``class Tokens(MapsAsTokens, SomeMapBackbone)``, same parameters and names).
    """

    output_format = "tokens"  # the heads take their point-cloud variants (aff_seg.modeling.variants)

    def dense_maps(self, x):
        """x: ``b x 3 x H x W`` -> ``{res{i}: b x C_i x h_i x w_i}``."""
        return super().forward(x)

    def forward(self, x):
        """x: ``b x 3 x H x W`` -> dict of tokens, positions and grid shape per level."""
        s = _GRID_STRIDE  # ceil division without negative operands (exported sizes, see merging.reserve_count)
        grid_shape = ((x.shape[-2] + s - 1) // s, (x.shape[-1] + s - 1) // s)
        out = {}
        for name, feature in self.dense_maps(x).items():
            tokens, pos = grid_tokens(feature, self._out_feature_strides[name])
            out[name] = tokens
            out[f"{name}_pos"] = pos
            out[f"{name}_spatial_shape"] = grid_shape
        return out


@BACKBONE_REGISTRY.register()
class D2ResNetTokens(MapsAsTokens, Backbone):
    """detectron2's ResNet (``MODEL.RESNETS.*``, under ``.resnet``) with its outputs as tokens
    (``MapsAsTokens``). The input must be padded to a multiple of 32 (``MASK_FORMER.SIZE_DIVISIBILITY``).
    """

    @configurable
    def __init__(self, *, resnet: Backbone):
        """resnet: the detectron2 ResNet whose ``res2..res5`` maps become tokens."""
        super().__init__()
        self.resnet = resnet
        self._out_features = list(self.resnet._out_features)
        self._out_feature_strides = dict(self.resnet._out_feature_strides)
        self._out_feature_channels = dict(self.resnet._out_feature_channels)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {"resnet": build_resnet_backbone(cfg, input_shape)}

    @property
    def size_divisibility(self):
        return 32

    def dense_maps(self, x):
        return self.resnet(x)
