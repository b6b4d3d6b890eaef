"""Checks of what reaches a meta-architecture: the batched inputs and the config's counts.

Every meta-architecture calls ``check_batched_inputs`` first in ``forward`` and
``check_model_config`` in ``from_config``, so that a bad input or config stops with one message
naming what is wrong (which image, which key) instead of an error from deep inside the model.
"""
import math
import numbers

import numpy as np
import torch

__all__ = ["InvalidInputError", "check_batched_inputs", "check_model_config"]

IMAGE_DTYPES = "uint8 or floating point (float16/bfloat16/float32/float64)"
# largest |pixel value| accepted: far above any image scale (0-255, 0-65535), far below values
# whose normalised squares overflow float32 inside the model's norms
MAX_PIXEL_VALUE = 1e6


class InvalidInputError(ValueError, TypeError):
    """Batched inputs a model cannot use; the message lists every problem found."""


def _image_problems(image, num_channels):
    if isinstance(image, np.ndarray):
        return ["is a numpy array; pass torch.as_tensor(np.ascontiguousarray(a.transpose(2, 0, 1))) "
                "(C x H x W)"]
    if not isinstance(image, torch.Tensor):
        return [f"must be a torch.Tensor, got {type(image).__name__}"]
    problems = []
    if image.dtype != torch.uint8 and not image.dtype.is_floating_point:
        problems.append(f"has dtype {image.dtype}; expected {IMAGE_DTYPES}")
    if image.dim() != 3 or image.shape[0] != num_channels or 0 in image.shape:
        problems.append(f"must be a non-empty {num_channels} x H x W tensor, got shape {tuple(image.shape)}")
    elif image.dtype.is_floating_point and not (image.abs() <= MAX_PIXEL_VALUE).all():
        finite = torch.isfinite(image)
        if not finite.all():
            problems.append(f"has {int((~finite).sum())} non-finite (NaN or inf) values")
        else:
            problems.append(f"has values up to |{float(image.abs().max()):.3g}|, beyond the {MAX_PIXEL_VALUE:g} "
                            "accepted for pixels")
    return problems


def _size_problem(value):
    """Whether ``value`` is not a positive integer (python, numpy or one-element integer tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.item()
    return isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0


def check_batched_inputs(batched_inputs, num_channels, owner):
    """Raise ``InvalidInputError`` (a ``ValueError`` and ``TypeError``) listing every problem.

    Args:
        batched_inputs: list of dicts, each with ``image`` (``C x H x W`` uint8 or float
            tensor with finite values of at most ``MAX_PIXEL_VALUE`` in magnitude) and optionally
            ``height``/``width`` (positive integers: the output size).
        num_channels: C.
        owner: the model's name, to start the message with.
    """
    if not isinstance(batched_inputs, (list, tuple)):
        raise InvalidInputError(
            f"{owner}: batched_inputs must be a list of dicts, got {type(batched_inputs).__name__}")
    if len(batched_inputs) == 0:
        raise InvalidInputError(f"{owner}: batched_inputs is empty")
    problems = []
    for i, x in enumerate(batched_inputs):
        if not isinstance(x, dict):
            problems.append(f"input {i} must be a dict with an 'image', got {type(x).__name__}")
            continue
        if "image" not in x:
            problems.append(f"input {i} has no 'image' (keys: {sorted(map(str, x))})")
        else:
            problems += [f"input {i}: 'image' {p}" for p in _image_problems(x["image"], num_channels)]
        for key in ("height", "width"):
            if key in x and _size_problem(x[key]):
                problems.append(f"input {i}: '{key}' must be a positive integer, got {x[key]!r}")
    if problems:
        raise InvalidInputError(f"{owner}: invalid batched_inputs:\n  " + "\n  ".join(problems))


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_model_config(cfg):
    """Raise ``ValueError`` naming every key of ``cfg.MODEL`` whose value cannot build a model:
    counts that must be positive, PIXEL_MEAN/PIXEL_STD (matching lengths, std > 0), and
    HIDDEN_DIM divisible by NHEADS."""
    mf = cfg.MODEL.MASK_FORMER
    problems = [
        f"MODEL.{key}={value!r} must be a positive integer"
        for key, value in (
            ("MASK_FORMER.NUM_OBJECT_QUERIES", mf.NUM_OBJECT_QUERIES),
            ("MASK_FORMER.DEC_LAYERS", mf.DEC_LAYERS),
            ("MASK_FORMER.HIDDEN_DIM", mf.HIDDEN_DIM),
            ("MASK_FORMER.NHEADS", mf.NHEADS),
            ("MASK_FORMER.DIM_FEEDFORWARD", mf.DIM_FEEDFORWARD),
            ("MASK_FORMER.TRAIN_NUM_POINTS", mf.TRAIN_NUM_POINTS),
            ("SEM_SEG_HEAD.NUM_CLASSES", cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
            ("SEM_SEG_HEAD.MASK_DIM", cfg.MODEL.SEM_SEG_HEAD.MASK_DIM),
            ("SEM_SEG_HEAD.CONVS_DIM", cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM),
        )
        if not _positive_int(value)
    ]
    if _positive_int(mf.HIDDEN_DIM) and _positive_int(mf.NHEADS) and mf.HIDDEN_DIM % mf.NHEADS:
        problems.append(f"MODEL.MASK_FORMER.HIDDEN_DIM={mf.HIDDEN_DIM} is not divisible by NHEADS={mf.NHEADS}")
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if len(mean) != len(std):
        problems.append(f"MODEL.PIXEL_MEAN has {len(mean)} values but MODEL.PIXEL_STD has {len(std)}")
    if not all(math.isfinite(m) for m in mean):
        problems.append(f"MODEL.PIXEL_MEAN={mean} must be finite")
    if not all(math.isfinite(s) and s > 0 for s in std):
        problems.append(f"MODEL.PIXEL_STD={std} must be finite and positive")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
