"""FASeg's pixel decoder on dense maps: Mask2Former's with learned conditional position encodings
(Zhang et al., "Dynamic Focus-aware Positional Queries for Semantic Segmentation", CVPR 2023;
github.com/ziplab/FASeg).  See docs/faseg.md.

Each level's encoding is a 3x3 depthwise conv of its projected features (``pos_linear.l``),
in place of the sine encoding, for res5, res4, res3 (fed to the deformable encoder) and res2
(projected by ``input_proj.3`` only for this).  The decoder gets four levels (res5, res4, res3
and the res2 FPN output) and their four encodings.
"""
from typing import Dict

from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..point_utils import autocast_off
from .msdeformattn import MSDeformAttnPixelDecoder

__all__ = ["MSDeformAttnPixelDecoder4ScalesFASeg"]


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder4ScalesFASeg(MSDeformAttnPixelDecoder):
    """``forward_features(features)`` takes ``{res2..res5: b x C_i x H/s_i x W/s_i}`` and returns
    ``(mask_features b x mask_dim x H/4 x W/4, the res5 encoder output, [res5, res4, res3, res2]
    outputs b x conv_dim x h_l x w_l, [res5, res4, res3, res2] position encodings, the same shapes)``.

    Keys: upstream's plus ``input_proj.3`` (res2: 1x1 conv + GroupNorm) and ``pos_linear.{0..3}``.
    The original sizes ``input_proj.3`` for ``C_res3 // 2`` input channels, i.e. assumes
    ``C_res2 = C_res3 / 2`` (true of ResNet and Swin, whose checkpoints load unchanged); here it
    takes ``C_res2``, so any backbone works.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], **kwargs):
        """Arguments as ``MSDeformAttnPixelDecoder``; exactly one FPN level (res2)."""
        super().__init__(input_shape, **kwargs)
        if (self.num_fpn_levels != 1 or self.transformer_num_feature_levels != 3
                or self.feature_strides[0] != self.common_stride):
            raise ValueError(
                "FASeg's pixel decoder needs res2 and exactly three encoder levels (res3, res4, res5): "
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES={self.in_features}, DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES="
                f"{self.transformer_in_features}, COMMON_STRIDE={self.common_stride}"
            )
        conv_dim = self.mask_features.in_channels
        del self.pe_layer  # no sine encoding: the encodings are learned
        res2_proj = nn.Sequential(nn.Conv2d(self.feature_channels[0], conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
        nn.init.xavier_uniform_(res2_proj[0].weight, gain=1)
        nn.init.constant_(res2_proj[0].bias, 0)
        self.input_proj.append(res2_proj)
        self.pos_linear = nn.ModuleList(
            nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, groups=conv_dim) for _ in range(4)
        )
        self.maskformer_num_feature_levels = 4

    def forward_features(self, features):
        """See the class docstring."""
        device = features[self.in_features[0]].device
        with autocast_off(device.type):
            srcs, pos = [], []
            # res5, res4, res3, then res2 (the original does not cast res2 to float: fp16 under AMP)
            for idx, name in enumerate(self.transformer_in_features[::-1] + self.in_features[:1]):
                src = self.input_proj[idx](features[name].float())
                srcs.append(src)
                pos.append(self.pos_linear[idx](src))
            out = self.fpn(features, self.encode(srcs[:3], pos[:3]))
            return self.mask_features(out[-1]), out[0], out, pos
