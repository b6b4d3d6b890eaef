"""Helpers of the head tests: a fake token backbone, small configs, training targets.

``FakeTokenBackbone`` stands in for the AFF backbone with the same output dict (tokens,
positions, canvas size).

res2 holds every stride-4 grid point in a random order; res3..res5 are nested random subsets
(a quarter each time), as the AFF merge produces.  Features come from a stride-4 patch
convolution so that gradients reach the head through them.
"""
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image
from panopticapi.utils import rgb2id
from torch import nn

import aff_seg  # noqa: F401  (before detectron2)
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.structures import Instances


class FakeTokenBackbone(Backbone):
    def __init__(self, channels=(16, 24, 32, 40), ds_rate=0.25, seed=0):
        super().__init__()
        self.channels = channels
        self.ds_rate = ds_rate
        self.seed = seed
        self.stem = nn.Conv2d(3, channels[0], kernel_size=4, stride=4)
        self.proj = nn.ModuleList(nn.Linear(channels[0], c) for c in channels[1:])

    def output_shape(self):
        return {f"res{i + 2}": ShapeSpec(channels=c, stride=4 * 2 ** i) for i, c in enumerate(self.channels)}

    def forward(self, x):
        b, _, hh, ww = x.shape
        h, w = math.ceil(hh / 4), math.ceil(ww / 4)
        x = nn.functional.pad(x, (0, w * 4 - ww, 0, h * 4 - hh))
        feat = self.stem(x).flatten(2).transpose(1, 2)  # b x h*w x c0
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([xs, ys], -1).reshape(1, h * w, 2).float().expand(b, -1, -1).to(x.device)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.stack([torch.randperm(h * w, generator=gen) for _ in range(b)]).to(x.device)  # b x n
        out = {}
        n = h * w
        for i in range(4):
            if i:
                n = max(int(n * self.ds_rate), 1)
                order = order[:, :n]
            tok = feat.gather(1, order.unsqueeze(-1).expand(-1, -1, feat.shape[-1]))
            out[f"res{i + 2}"] = tok if i == 0 else self.proj[i - 1](tok)
            out[f"res{i + 2}_pos"] = pos.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
            out[f"res{i + 2}_spatial_shape"] = (h, w)
        return out


@BACKBONE_REGISTRY.register()
def build_fake_token_backbone(cfg, input_shape):
    """Backbone ``FakeTokenBackbone`` with ``cfg.MODEL.AFF.EMBED_DIM`` channels (tests only)."""
    return FakeTokenBackbone(channels=tuple(cfg.MODEL.AFF.EMBED_DIM), ds_rate=cfg.MODEL.AFF.DS_RATE)


build_fake_token_backbone.output_format = "tokens"  # the heads take their point-cloud variants


# ----------------------------------------------------------------------------------------------
# configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def config_path(relpath):
    return os.path.join(REPO, "configs", relpath)


def load_cfg(relpath, *opts):
    """A project config file merged onto the defaults, on CPU."""
    cfg = get_cfg()
    aff_seg.add_maskformer2_config(cfg)
    cfg.merge_from_file(config_path(relpath))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
    return cfg


def tiny_cfg(num_classes=4, backbone="fake", dim=64, queries=8, dec_layers=4, enc_layers=2, points=256):
    """A small MaskFormer config (fake or tiny AFF backbone) for fast CPU tests."""
    cfg = get_cfg()
    aff_seg.add_maskformer2_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    if backbone == "fake":
        cfg.MODEL.BACKBONE.NAME = "build_fake_token_backbone"
        cfg.MODEL.AFF.EMBED_DIM = [16, 24, 32, 40]
    else:  # a tiny AutoFocusFormer
        cfg.MODEL.BACKBONE.NAME = "AutoFocusFormer"
        cfg.MODEL.AFF.EMBED_DIM = [16, 32, 32, 48]
        cfg.MODEL.AFF.DEPTHS = [1, 1, 1, 1]
        cfg.MODEL.AFF.NUM_HEADS = [1, 2, 2, 3]
        cfg.MODEL.AFF.NBHD_SIZE = [16, 16, 16, 16]
        cfg.MODEL.AFF.DROP_PATH_RATE = 0.0
    head = cfg.MODEL.SEM_SEG_HEAD
    head.NAME = "MaskFormerHead"
    head.NUM_CLASSES = num_classes
    head.IGNORE_VALUE = 255
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.CONVS_DIM = dim
    head.MASK_DIM = dim
    head.TRANSFORMER_ENC_LAYERS = enc_layers
    mf = cfg.MODEL.MASK_FORMER
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.HIDDEN_DIM = dim
    mf.DIM_FEEDFORWARD = 2 * dim
    mf.NUM_OBJECT_QUERIES = queries
    mf.DEC_LAYERS = dec_layers
    mf.DROPOUT = 0.0
    mf.CLASS_WEIGHT = 2.0
    mf.MASK_WEIGHT = 5.0
    mf.DICE_WEIGHT = 5.0
    mf.TRAIN_NUM_POINTS = points
    return cfg


# ----------------------------------------------------------------------------------------------
# batches


def instances_from_masks(masks, classes):
    """``T x H x W`` bool masks and ``T`` class ids -> training Instances."""
    inst = Instances(tuple(masks.shape[-2:]))
    inst.gt_masks = masks.bool()
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
    return inst


def record_image(record, size=None):
    """A dataset record's image as a ``3 x H x W`` float tensor (optionally cropped to ``size``)."""
    image = np.asarray(Image.open(record["file_name"]).convert("RGB"), dtype=np.float32)
    image = torch.as_tensor(image).permute(2, 0, 1)
    return image if size is None else image[:, : size[0], : size[1]]


def semantic_segments(record, ignore_label=255):
    """One mask per class present in the semantic label png."""
    label = torch.from_numpy(np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64))
    classes = [c for c in label.unique().tolist() if c != ignore_label]
    return torch.stack([label == c for c in classes]), classes


def instance_segments(record):
    """One mask per non-crowd COCO-format annotation."""
    h, w = record["height"], record["width"]
    anns = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
    masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))) for a in anns]
    return torch.as_tensor(np.array(masks, dtype=bool).reshape(-1, h, w)), [a["category_id"] for a in anns]


def panoptic_segments(record):
    """One mask per panoptic segment."""
    ids = torch.from_numpy(rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]), dtype=np.uint32)))
    infos = [s for s in record["segments_info"] if not s.get("iscrowd", 0)]
    return torch.stack([ids == s["id"] for s in infos]), [s["category_id"] for s in infos]


def training_input(record, segments, size=None):
    """A MaskFormer training input from a record, optionally cropped (empty masks dropped)."""
    image = record_image(record, size)
    masks, classes = segments(record)
    masks = masks[:, : image.shape[1], : image.shape[2]]
    keep = masks.flatten(1).any(1)
    classes = [c for c, k in zip(classes, keep.tolist()) if k]
    return {"image": image, "instances": instances_from_masks(masks[keep], classes)}
