"""Sliding-window inference for any semantic model (``TEST.SLIDING_WINDOW.*``).

detectron2's ``SemanticSegmentor`` and the MaskFormer meta-architecture segment the whole (resized) test
image at once; models trained on crops (SegFormer's Cityscapes recipe: 1024x1024 windows every 768 pixels
on 1024x2048 images) are evaluated window by window instead. ``SlidingWindowInference`` wraps such a model:
it cuts the image into ``SIZE`` windows whose top-left corners are ``STRIDE`` apart, the last row and column
moved back to end at the image border, runs the model on every window (as its own image), averages the
per-class scores where windows overlap, and resizes the average to the requested output size.
It returns ``sem_seg`` only.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SlidingWindowInference", "window_starts"]


def window_starts(length, window, stride):
    """Start offsets of windows of ``window`` pixels every ``stride`` pixels covering ``[0, length)``."""
    count = max(math.ceil((length - window) / stride), 0) + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


class SlidingWindowInference(nn.Module):
    """``model`` evaluated on sliding windows; same inputs and ``sem_seg`` output (K x height x width)."""

    def __init__(self, model, window, stride):
        """
        Args:
            model: a semantic model taking detectron2 input dicts and returning ``sem_seg`` scores.
            window, stride: (h, w) in pixels of the model's input images (after the test resize).
        """
        super().__init__()
        window, stride = tuple(window), tuple(stride)
        if len(window) != 2 or min(window) <= 0:
            raise ValueError(f"TEST.SLIDING_WINDOW.SIZE must be two positive sizes (h, w), got {list(window)}")
        if len(stride) != 2 or min(stride) <= 0:
            raise ValueError(f"TEST.SLIDING_WINDOW.STRIDE must be two positive strides (h, w), got {list(stride)}")
        self.model = model
        self.window = window
        self.stride = stride

    @classmethod
    def from_config(cls, cfg, model):
        sliding = cfg.TEST.SLIDING_WINDOW
        return cls(model, sliding.SIZE, sliding.STRIDE)

    def forward(self, batched_inputs):
        return [{"sem_seg": self.segment(inputs)} for inputs in batched_inputs]

    def segment(self, inputs):
        """Averaged window scores of one input dict, resized to its ``height`` x ``width``."""
        image = inputs["image"]
        height, width = image.shape[-2:]
        wh, ww = self.window
        if wh > height or ww > width:
            raise ValueError(
                f"TEST.SLIDING_WINDOW.SIZE {list(self.window)} is larger than the {height}x{width} test image "
                "(after INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST): use a smaller window or whole-image inference"
            )
        scores, counts = None, torch.zeros(height, width)
        for top in window_starts(height, wh, self.stride[0]):
            for left in window_starts(width, ww, self.stride[1]):
                crop = image[:, top: top + wh, left: left + ww]
                out = self.model([{"image": crop, "height": wh, "width": ww}])[0]["sem_seg"]
                if scores is None:
                    scores = out.new_zeros((out.shape[0], height, width))
                    counts = counts.to(out.device)
                scores[:, top: top + wh, left: left + ww] += out
                counts[top: top + wh, left: left + ww] += 1
        scores = scores / counts
        size = (inputs.get("height", height), inputs.get("width", width))
        if size != (height, width):
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        return scores
