"""Test-time augmentation for semantic segmentation (``TEST.AUG.*``)."""
import copy

import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import HFlipTransform
from detectron2.modeling import DatasetMapperTTA
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["SemanticSegmentorWithTTA"]


class SemanticSegmentorWithTTA(nn.Module):
    """Wrap a model whose outputs hold ``sem_seg`` (K x H x W class scores at the input's
    ``height`` x ``width``) and average those scores over resized and flipped copies of each
    image (``TEST.AUG.MIN_SIZES``, ``MAX_SIZE``, ``FLIP``); flipped scores are flipped back.

    Same call interface as the model in eval mode; returns ``[{"sem_seg": K x H x W}]``.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size=1):
        """
        Args:
            cfg: config with ``TEST.AUG``.
            model: the segmentation model (a DDP wrapper is unwrapped).
            tta_mapper: dataset dict -> list of augmented dicts, each with a "transforms"
                entry; default ``DatasetMapperTTA(cfg)``.
            batch_size: how many augmented copies go through the model at once.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.input_format = cfg.INPUT.FORMAT
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    def _with_image(self, dataset_dict):
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        ret.setdefault("height", ret["image"].shape[1])
        ret.setdefault("width", ret["image"].shape[2])
        return ret

    @torch.no_grad()
    def _inference_one_image(self, dataset_dict):
        augmented = self.tta_mapper(dataset_dict)
        flipped = [
            any(isinstance(t, HFlipTransform) for t in x.pop("transforms").transforms) for x in augmented
        ]
        total = None
        for start in range(0, len(augmented), self.batch_size):
            outputs = self.model(augmented[start : start + self.batch_size])
            for output, flip in zip(outputs, flipped[start : start + self.batch_size]):
                scores = output["sem_seg"]
                scores = scores.flip(dims=[2]) if flip else scores
                total = scores.clone() if total is None else total + scores
        return {"sem_seg": total / len(augmented)}

    def forward(self, batched_inputs):
        return [self._inference_one_image(self._with_image(x)) for x in batched_inputs]
