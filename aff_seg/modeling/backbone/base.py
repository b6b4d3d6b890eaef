"""What the four-stage detectron2 backbones share: stage ``i`` gives output ``res{i+2}`` at the nominal stride
``4 * 2**i``. ``StagesBackbone`` records the chosen outputs (AFF's tokens and the dense maps alike; detectron2's
``Backbone.output_shape`` reads them), ``DenseMapsBackbone`` adds the dense-map contract (Swin, Focal, MiT,
BoostFormer) and ``EncoderMapsBackbone`` the construction from a config node (MiT, BoostFormer).
"""
from detectron2.config import configurable
from detectron2.modeling import Backbone

__all__ = ["OUT_FEATURES", "StagesBackbone", "DenseMapsBackbone", "EncoderMapsBackbone", "check_out_features"]

OUT_FEATURES = ("res2", "res3", "res4", "res5")  # stage i -> res{i+2}, stride 4 * 2**i


def check_out_features(out_features, key):
    """Stage indices of ``out_features`` (some of res2..res5); ``key`` names the config key in errors."""
    unknown = [f for f in out_features if f not in OUT_FEATURES]
    if unknown or not out_features:
        raise ValueError(f"{key}: {list(out_features)} must be a non-empty subset of {list(OUT_FEATURES)}")
    return [OUT_FEATURES.index(f) for f in out_features]


class StagesBackbone(Backbone):
    """detectron2 ``Backbone`` of four stages: ``_set_outputs`` records the chosen outputs, their nominal
    strides and channels for detectron2's ``output_shape``."""

    def _set_outputs(self, out_features, channels):
        """``channels``: the width of each of the four stages."""
        self._out_features = list(out_features)
        self._out_feature_strides = {f: 4 * 2 ** OUT_FEATURES.index(f) for f in out_features}
        self._out_feature_channels = {f: channels[OUT_FEATURES.index(f)] for f in out_features}


class DenseMapsBackbone(StagesBackbone):
    """A four-stage encoder returning dense maps: ``{res2..res5: b x C_i x H/s x W/s}`` at strides
    4/8/16/32, the input padded to a multiple of 32."""

    output_format = "maps"

    @property
    def size_divisibility(self):
        return 32

    def named_outputs(self, maps):
        """The encoder's list of stage maps as ``{res*: map}``."""
        return dict(zip(self._out_features, maps))


class EncoderMapsBackbone(DenseMapsBackbone):
    """``DenseMapsBackbone`` over ``encoder_class`` (listed after this class in the bases), an encoder whose
    constructor takes ``out_indices``, whose ``forward`` returns the list of stage maps and whose stage
    widths are ``embed_dims``. Built from ``cfg.MODEL.<config_node>``: each key is the encoder's argument
    of that name in lower case (``EMBED_DIMS`` -> ``embed_dims``), plus ``in_chans`` and ``out_features``."""

    encoder_class = None
    config_node = None

    @configurable
    def __init__(self, *, out_features=OUT_FEATURES, **kwargs):
        out_indices = check_out_features(out_features, f"MODEL.{self.config_node}.OUT_FEATURES")
        self.encoder_class.__init__(self, out_indices=out_indices, **kwargs)
        self._set_outputs(out_features, self.embed_dims)

    def forward(self, x):
        return self.named_outputs(self.encoder_class.forward(self, x))

    @classmethod
    def from_config(cls, cfg, input_shape):
        node = cfg.MODEL[cls.config_node]
        arguments = {key.lower(): list(value) if isinstance(value, (list, tuple)) else value for key, value in node.items()}
        return {"in_chans": input_shape.channels, **arguments}
