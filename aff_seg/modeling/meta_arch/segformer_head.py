"""All-MLP semantic heads for detectron2's ``SemanticSegmentor``: ``SegFormerHead`` (SegFormer, Xie et al. 2021),
``SegFormerConvHead`` (the same decoder as MMSegmentation >= 0.17 builds it) and ``BoostFormerHead``
(BoostFormer's weighted sum), in ``SEM_SEG_HEADS_REGISTRY``.

Both project every input map to ``D = MODEL.SEM_SEG_HEAD.CONVS_DIM`` channels with a per-pixel linear
(``linear_c.i.proj``) and upsample it bilinearly to the first (stride-4) map, then fuse:

* ``SegFormerHead``: concatenate in the order [last, ..., first], 1x1 conv (4D -> D, no bias), norm, ReLU;
* ``SegFormerConvHead``: the projections are 1x1 conv (no bias) + norm + ReLU (``linear_c.i.conv/norm``),
  concatenated in the order [first, ..., last], then as ``SegFormerHead``;
* ``BoostFormerHead``: ``sum_i w_i * map_i`` with learnable scalars ``w`` (init 1), norm, ReLU. The original
  also creates a 4D -> D conv that it never calls; it is not built here.

then dropout and a 1x1 classifier: logits at stride 4. Training: cross-entropy (ignore
``IGNORE_VALUE``) of the logits upsampled to the padded input size, times ``LOSS_WEIGHT``. Inference:
the logits upsampled to the padded input size (the meta-architecture then crops and resizes them).
"""
import torch
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

__all__ = ["SegFormerHead", "SegFormerConvHead", "BoostFormerHead"]


class LinearEmbed(nn.Module):
    """Per-pixel Linear ``b x c x h x w -> b x D x h x w``."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, x):
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvEmbed(nn.Module):
    """1x1 conv without bias, norm, ReLU: ``b x c x h x w -> b x D x h x w``."""

    def __init__(self, in_dim, dim, norm):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 1, bias=False)
        self.norm = get_norm(norm, dim)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class _AllMLPHead(nn.Module):
    """Projection, fusion (``fuse``, by the subclass), norm + ReLU, dropout, classifier; loss and upsampling."""

    @configurable
    def __init__(self, input_shape, *, num_classes, embed_dim, norm, dropout, ignore_value=255, loss_weight=1.0):
        """
        Args:
            input_shape: ``{name: ShapeSpec}`` of the features used, the stride-4 one first when sorted by stride.
            num_classes: K; embed_dim: D; norm: detectron2 norm name ("BN", "SyncBN", "GN" ...).
            dropout: dropout before the classifier; ignore_value, loss_weight: as in detectron2's heads.
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in shapes]
        self.common_stride = shapes[0][1].stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.linear_c = nn.ModuleList(self.embedding(shape.channels, embed_dim, norm) for _, shape in shapes)
        self.norm = get_norm(norm, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in head.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES: the backbone has no {missing} ({list(input_shape)})")
        return {
            "input_shape": {f: input_shape[f] for f in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "embed_dim": head.CONVS_DIM,
            "norm": head.NORM,
            "dropout": head.DROPOUT,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
        }

    def embedding(self, in_dim, dim, norm):
        """The projection of one input map to ``dim`` channels."""
        return LinearEmbed(in_dim, dim)

    def layers(self, features):
        """Stride-4 logits ``b x K x H/4 x W/4`` of the backbone's ``features``."""
        maps = [features[f] for f in self.in_features]
        size = maps[0].shape[-2:]
        embedded = [
            F.interpolate(embed(x), size=size, mode="bilinear", align_corners=False)
            for embed, x in zip(self.linear_c, maps)
        ]
        fused = F.relu(self.norm(self.fuse(embedded)))
        return self.classifier(self.dropout(fused))

    def forward(self, features, targets=None):
        """``targets``: b x H x W labels (padded with ``ignore_value``), in training."""
        logits = self.layers(features)
        if self.training:
            logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, targets, reduction="mean", ignore_index=self.ignore_value)
            return None, {"loss_sem_seg": loss * self.loss_weight}
        logits = F.interpolate(logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return logits, {}


@SEM_SEG_HEADS_REGISTRY.register()
class SegFormerHead(_AllMLPHead):
    """SegFormer's all-MLP decoder: concatenation fused by a 1x1 conv."""

    @configurable
    def __init__(self, input_shape, *, embed_dim, norm, **kwargs):
        super().__init__(input_shape, embed_dim=embed_dim, norm=norm, **kwargs)
        self.linear_fuse = nn.Conv2d(len(input_shape) * embed_dim, embed_dim, 1, bias=False)

    def fuse(self, embedded):
        """``embedded``: the projected maps, b x D x h x w each, first stage first."""
        return self.linear_fuse(torch.cat(embedded[::-1], dim=1))


@SEM_SEG_HEADS_REGISTRY.register()
class SegFormerConvHead(SegFormerHead):
    """SegFormer's decoder as MMSegmentation (>= 0.17) builds it (its ``SegformerHead``): each projection is a
    1x1 conv + norm + ReLU, and the concatenation keeps the stage order. Its checkpoints load into this head."""

    def embedding(self, in_dim, dim, norm):
        return ConvEmbed(in_dim, dim, norm)

    def fuse(self, embedded):
        return self.linear_fuse(torch.cat(embedded, dim=1))


@SEM_SEG_HEADS_REGISTRY.register()
class BoostFormerHead(_AllMLPHead):
    """BoostFormer's decoder: a weighted sum of the projected maps."""

    @configurable
    def __init__(self, input_shape, **kwargs):
        super().__init__(input_shape, **kwargs)
        self.weights = nn.Parameter(torch.ones(len(input_shape), 1))

    def fuse(self, embedded):
        return sum(w * x for w, x in zip(self.weights, embedded))
