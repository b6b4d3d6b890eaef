"""Run an exported segmentation model (a ``torch.export`` program or an ONNX file) and
post-process its raw outputs exactly as the eager model (``MaskFormer``, or detectron2's
``SemanticSegmentor`` for SegFormer/BoostFormer) does.

This module imports torch and numpy (``onnxruntime`` for ONNX files; detectron2's structures
for instance results and its transforms for ``ExportedPredictor``, when they are used), but
nothing of aff_seg: it can be copied next to an exported
model and used without the project. ``MaskFormer`` itself post-processes with the functions
below, so the eager and exported paths share one implementation.

An export directory (written by ``tools/export_model.py``) holds ``model.pt2`` or
``model.onnx`` and ``model.json`` (see ``ExportedModel``).
"""
import json
import os

import numpy as np
import torch
from torch.nn import functional as F


__all__ = [
    "MODEL_FILES", "SETTINGS_FILE", "MASK_OUTPUTS", "TOKEN_OUTPUTS", "SEMANTIC_OUTPUTS", "ExportedModel", "ExportedPredictor", "postprocess",
    "semantic_inference", "panoptic_inference", "instance_inference",
]

MODEL_FILES = {"torch_export": "model.pt2", "onnx": "model.onnx"}
SETTINGS_FILE = "model.json"
# the exported graph's outputs, in order (``model.json``'s ``outputs``): a MaskFormer's mask
# classification, then for a token backbone (AFF) the kept tokens per stage; or a semantic
# model's logits at the head's stride
MASK_OUTPUTS = ("pred_logits", "pred_masks")
TOKEN_OUTPUTS = ("res2_pos", "res3_pos", "res4_pos", "res5_pos")
SEMANTIC_OUTPUTS = ("sem_seg_logits",)


def sem_seg_postprocess(result, img_size, output_height, output_width):
    """detectron2's ``sem_seg_postprocess``: crop ``C x H_pad x W_pad`` to the image inside the
    padding, resize (bilinear) to the output size. Restated here because importing detectron2's
    modeling needs its compiled extension (or aff_seg's compatibility fixes)."""
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]


def semantic_inference(mask_cls, mask_pred):
    """``Q x (K+1)``, ``Q x H x W`` -> ``K x H x W`` class scores."""
    return torch.einsum("qc,qhw->chw", F.softmax(mask_cls, dim=-1)[..., :-1], mask_pred.sigmoid())


def panoptic_inference(mask_cls, mask_pred, settings):
    """``Q x (K+1)``, ``Q x H x W`` -> (``H x W`` int32 segment ids, segments_info).

    ``settings``: ``num_classes``, ``object_mask_threshold``, ``overlap_threshold``, ``thing_ids``.
    """
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_pred = mask_pred.sigmoid()
    keep = labels.ne(settings["num_classes"]) & (scores > settings["object_mask_threshold"])
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks

    h, w = cur_masks.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=cur_masks.device)
    segments_info = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    thing_ids = set(settings["thing_ids"])
    cur_mask_ids = cur_prob_masks.argmax(0)
    stuff_memory = {}
    segment_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k].item())
        isthing = pred_class in thing_ids
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < settings["overlap_threshold"]:
                continue
            if not isthing:  # merge the regions of one stuff class
                if pred_class in stuff_memory:
                    panoptic_seg[mask] = stuff_memory[pred_class]
                    continue
                stuff_memory[pred_class] = segment_id + 1
            segment_id += 1
            panoptic_seg[mask] = segment_id
            segments_info.append({"id": segment_id, "isthing": bool(isthing), "category_id": pred_class})
    return panoptic_seg, segments_info


def instance_inference(mask_cls, mask_pred, settings):
    """Top (query, class) pairs by a stable descending sort of the class score -> Instances.

    ``settings``: ``num_classes``, ``test_topk_per_image``, ``panoptic_on`` and ``thing_ids``
    (panoptic models report instances of thing classes only).
    """
    from detectron2.structures import Boxes, Instances

    num_classes = settings["num_classes"]
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]  # Q x K
    flat = scores.flatten(0, 1)
    topk = min(settings["test_topk_per_image"], flat.numel())
    # ties go to the lower (query, class) index
    sorted_scores, order = torch.sort(flat, descending=True, stable=True)
    scores_per_image, topk_indices = sorted_scores[:topk], order[:topk]
    labels_per_image = topk_indices % num_classes
    mask_pred = mask_pred[torch.div(topk_indices, num_classes, rounding_mode="floor")]

    if settings["panoptic_on"]:
        thing_ids = torch.tensor(sorted(settings["thing_ids"]), device=labels_per_image.device, dtype=torch.int64)
        keep = torch.isin(labels_per_image, thing_ids)
        scores_per_image, labels_per_image = scores_per_image[keep], labels_per_image[keep]
        mask_pred = mask_pred[keep]

    result = Instances(mask_pred.shape[-2:])
    result.pred_masks = (mask_pred > 0).float()
    result.pred_boxes = Boxes(torch.zeros(mask_pred.size(0), 4, device=mask_pred.device))
    flat_masks = result.pred_masks.flatten(1)
    mask_scores = (mask_pred.sigmoid().flatten(1) * flat_masks).sum(1) / (flat_masks.sum(1) + 1e-6)
    result.scores = scores_per_image * mask_scores
    result.pred_classes = labels_per_image
    return result


def postprocess(mask_cls, mask_pred, image_size, height, width, settings, retry=None):
    """One image's results from its raw outputs.

    Args:
        mask_cls: ``Q x (K+1)`` class logits; mask_pred: ``Q x H_pad x W_pad`` mask logits
            already upsampled to the padded input size.
        image_size: (h, w) of the image inside the padded input; height, width: output size.
        settings: the post-processing settings (``MaskFormer.postprocess_settings()``, or the
            ``postprocess`` entry of an export's ``model.json``).
        retry: optional wrapper of each step (detectron2's ``retry_if_cuda_oom``).
    Returns:
        dict with ``sem_seg`` (K x height x width), ``panoptic_seg`` and/or ``instances``.
    """
    retry = retry or (lambda fn: fn)
    result = {}
    before = settings["sem_seg_postprocess_before_inference"]
    if before:
        mask_pred = retry(sem_seg_postprocess)(mask_pred, image_size, height, width)
        mask_cls = mask_cls.to(mask_pred)
    if settings["semantic_on"]:
        r = retry(semantic_inference)(mask_cls, mask_pred)
        if not before:
            r = retry(sem_seg_postprocess)(r, image_size, height, width)
        result["sem_seg"] = r
    if settings["panoptic_on"]:
        result["panoptic_seg"] = retry(panoptic_inference)(mask_cls, mask_pred, settings)
    if settings["instance_on"]:
        result["instances"] = retry(instance_inference)(mask_cls, mask_pred, settings)
    return result


class ExportedModel:
    """An exported model and its settings, called like the eager model in inference.

    ``model.json`` holds ``config`` (the config file), ``format`` (torch_export / onnx),
    ``input`` (``format`` RGB/BGR, ``channels``, ``dtype``, ``pixel_mean``, ``pixel_std``, ``size_divisibility``,
    ``min_size``/``max_size``: the input sizes (after padding) the graph was exported for,
    ``valid_widths`` (AFF only): per height, the [min, max] width at which the exported graph
    is exact, ``min_size_test``/``max_size_test``: the test resize), ``outputs`` (the graph's
    output names) and ``postprocess`` (mask classification: see ``postprocess``; semantic
    logits: ``common_stride``, the factor to upsample them by).

    Args:
        directory: the export directory.
        device: torch device of the program (ONNX runs on ONNX Runtime's CPU provider).
    """

    def __init__(self, directory, device="cpu"):
        path = os.path.join(directory, SETTINGS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory!r} is not an export directory: {SETTINGS_FILE} is missing")
        with open(path) as f:
            self.settings = json.load(f)
        self.format = self.settings["format"]
        if self.format not in MODEL_FILES:
            raise ValueError(f"{path}: unknown format {self.format!r}, expected one of {sorted(MODEL_FILES)}")
        model_path = os.path.join(directory, MODEL_FILES[self.format])
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path} is missing")
        self.device = torch.device(device)
        self.input = self.settings["input"]
        self.pixel_mean = torch.tensor(self.input["pixel_mean"], dtype=torch.float32).view(-1, 1, 1)
        self.pixel_std = torch.tensor(self.input["pixel_std"], dtype=torch.float32).view(-1, 1, 1)
        if self.format == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            # no memory pattern: planned for one input shape, it does not carry over to the next size,
            # and without it AFF-Tiny at 512 x 512 peaked at 1.86 GiB instead of 2.67 GiB, no slower
            options.enable_mem_pattern = False
            self._session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
            self._input_name = self._session.get_inputs()[0].name
        else:
            self._program = torch.export.load(model_path).module().to(self.device)

    def check_input(self, image):
        """Raise a ValueError naming the expected and the received value when ``image`` is not
        an input the exported graph accepts: a ``1 x C x H x W`` tensor of the exported dtype
        (normalised), H and W multiples of the size divisibility within the exported range."""
        inp = self.input
        expected = f"1 x {inp['channels']} x H x W"
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"the exported model takes a {expected} torch.Tensor, got {type(image).__name__}")
        if image.dim() != 4:
            raise ValueError(f"the exported model takes a 4-d {expected} image, got {image.dim()}-d shape "
                             f"{tuple(image.shape)}")
        if image.shape[0] != 1:
            raise ValueError(f"the exported model takes one image per call ({expected}), got a batch of "
                             f"{image.shape[0]}")
        if image.shape[1] != inp["channels"]:
            raise ValueError(f"the exported model takes a {expected} image ({inp['format']}), got "
                             f"{image.shape[1]} channels (shape {tuple(image.shape)})")
        if str(image.dtype) != f"torch.{inp['dtype']}":
            raise ValueError(f"the exported model takes a {inp['dtype']} image (normalised), got {image.dtype}")
        h, w = image.shape[-2:]
        div, lo, hi = inp["size_divisibility"], inp["min_size"], inp["max_size"]
        if h % div or w % div:
            raise ValueError(f"input size {h} x {w} is not a multiple of the size divisibility {div} (pad the image)")
        if min(h, w) < lo or max(h, w) > hi:
            side = min(h, w) if min(h, w) < lo else max(h, w)
            raise ValueError(f"input size {h} x {w} is outside the exported range: each side must be in [{lo}, {hi}] "
                             f"pixels, got a side of {side}")
        if "valid_widths" not in inp:
            return
        widths = inp["valid_widths"].get(str(h))
        if widths is None or not widths[0] <= w <= widths[1]:
            example = "x".join(str(s) for s in inp["example_size"])
            raise ValueError(
                f"input size {h} x {w} is outside the exported range: the graph exported at {example} takes other "
                f"branches (global or local attention, a single reserved token per stage) there; allowed widths "
                f"for height {h}: {widths}")

    def raw(self, image):
        """Normalised, padded ``1 x C x H x W`` float32 -> dict of the graph outputs (``outputs``)."""
        self.check_input(image)
        if self.format == "onnx":
            outputs = self._session.run(None, {self._input_name: image.detach().cpu().numpy()})
            outputs = [torch.from_numpy(np.asarray(o)) for o in outputs]
        else:
            with torch.no_grad():
                try:
                    outputs = self._program(image.to(self.device))
                except AssertionError as e:  # a size check (guard) of the program, e.g. a branch of the example
                    if "Guard failed" not in str(e):
                        raise
                    h, w = image.shape[-2:]
                    example = "x".join(str(s) for s in self.input["example_size"])
                    raise ValueError(f"input size {h} x {w} is outside the exported range: the program exported at "
                                     f"{example} does not accept it ({e})") from None
        return dict(zip(self.settings["outputs"], outputs))

    def preprocess(self, image):
        """``C x H x W`` image (input format, 0-255) -> (normalised input padded to the size
        divisibility, (h, w) of the image)."""
        x = (image.to(torch.float32) - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        div = self.input["size_divisibility"]
        x = F.pad(x, (0, -w % div, 0, -h % div))
        return x.unsqueeze(0), (h, w)

    def __call__(self, batched_inputs):
        """Like the eager model in inference: a list of ``{"image": C x H x W, "height", "width"}``
        -> a list of result dicts (``sem_seg``, ``panoptic_seg``, ``instances``)."""
        results = []
        settings = self.settings["postprocess"]
        for item in batched_inputs:
            x, image_size = self.preprocess(item["image"])
            out = self.raw(x)
            height, width = item.get("height", image_size[0]), item.get("width", image_size[1])
            if "sem_seg_logits" in out:  # as SemanticSegmentor: the head's upsampling, then crop and resize
                logits = F.interpolate(out["sem_seg_logits"].float(), scale_factor=settings["common_stride"],
                                       mode="bilinear", align_corners=False)
                results.append({"sem_seg": sem_seg_postprocess(logits[0], image_size, height, width)})
                continue
            mask_pred = F.interpolate(out["pred_masks"].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
            results.append(postprocess(out["pred_logits"].float()[0], mask_pred[0], image_size, height, width, settings))
        return results


class ExportedPredictor:
    """detectron2's ``DefaultPredictor`` for an exported model: BGR image (H x W x 3 uint8) ->
    one result dict, with the test resize and input format of ``model.json``."""

    def __init__(self, directory, device="cpu"):
        # imported here: detectron2 0.6's transforms need aff_seg's compatibility fixes with a
        # current Pillow, which the demo (the caller) applies
        from detectron2.data import transforms as T

        self.model = ExportedModel(directory, device)
        inp = self.model.input
        self.input_format = inp["format"]
        self.aug = T.ResizeShortestEdge([inp["min_size_test"], inp["min_size_test"]], inp["max_size_test"])

    def __call__(self, original_image):
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return self.model([{"image": image, "height": height, "width": width}])[0]
