"""Random numbers of one training image.

In training, every random draw that belongs to one image -- its stochastic-depth decisions, the
matcher's points, the criterion's sampled points -- comes from a generator of that image, seeded
by the training stream from ``(SEED, position of the image in the stream)`` (the dict's ``seed``,
set by ``aff_seg.data.build``).  The draws then do not depend on the batch or the process the
image lands in: one process with a batch of 2 draws what two processes with a batch of 1 draw,
and a resumed run draws what the uninterrupted one drew.  Inputs without a ``seed`` (evaluation,
a loader of one's own) draw from torch's global RNG.
"""
import contextlib

import torch

__all__ = ["image_generators", "image_rand", "images_rand"]

_images = None  # inside image_generators: per image, (seed, {device: Generator})


@contextlib.contextmanager
def image_generators(batched_inputs):
    """Inside the block, ``image_rand(i, ...)`` draws from image i's generator, seeded by
    ``batched_inputs[i]["seed"]`` (global RNG when an input has no ``seed``)."""
    global _images
    seeds = [x.get("seed") for x in batched_inputs]
    previous = _images
    _images = [(seed, {}) for seed in seeds] if seeds and None not in seeds else None
    try:
        yield
    finally:
        _images = previous


def image_rand(index, *size, device=None):
    """``torch.rand(*size, device=device)`` from image ``index``'s generator (see module doc)."""
    if _images is None:
        return torch.rand(*size, device=device)
    if index >= len(_images):
        raise ValueError(f"image_rand: image {index} of a batch of {len(_images)} inputs")
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:  # one generator per GPU, however it is named
        device = torch.device("cuda", torch.cuda.current_device())
    seed, generators = _images[index]
    if device not in generators:
        generators[device] = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(*size, device=device, generator=generators[device])


def images_rand(count, *size, device=None):
    """``count x *size``: row i is ``image_rand(i, *size, device=device)``.  One draw when the
    inputs have no generators (global RNG); with them, one draw per image from its own
    generator, which is what keeps an image's numbers independent of its batch."""
    if _images is None:
        return torch.rand(count, *size, device=device)
    return torch.cat([image_rand(i, 1, *size, device=device) for i in range(count)])
