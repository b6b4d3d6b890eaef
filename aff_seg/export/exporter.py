"""Export the inference graph of a MaskFormer model: ``torch.export`` program or ONNX file.

The graph maps a normalised, padded ``1 x 3 x H x W`` float32 image to the raw outputs the
post-processing needs (``runtime.OUTPUT_NAMES``: class and mask logits, and the kept token
positions of every stage), with H and W dynamic multiples of the size divisibility. The clusten
ops are replaced by their PyTorch forms (``clusten.decompositions``), so the program needs
torch alone and the ONNX file standard operators; ``torch.sort(stable=True)`` becomes ONNX
``TopK``, whose ties go to the lower index as well.

Not exported: training (losses, matcher), test-time augmentation, batching (one image per call).
"""
import json
import os

import torch
from torch import nn

import clusten

from . import runtime

__all__ = ["InferenceGraph", "check_exportable", "export_program", "save", "export_model", "FORMATS"]

FORMATS = tuple(runtime.MODEL_FILES)
MAX_SIDE = 2048  # the largest input side the graph is exported for


class InferenceGraph(nn.Module):
    """``MaskFormer`` inference up to the raw outputs: image ``1 x 3 x H x W`` (normalised,
    padded) -> tuple in ``runtime.OUTPUT_NAMES`` order (``pred_logits`` ``1 x Q x (K+1)``,
    ``pred_masks`` ``1 x Q x H/4 x W/4``, ``res{i}_pos`` ``1 x n_i x 2``)."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head

    def forward(self, image):
        features = self.backbone(image)
        out = self.sem_seg_head(features)
        return (out["pred_logits"], out["pred_masks"]) + tuple(features[f"{k}_pos"] for k in ("res2", "res3", "res4", "res5"))


def check_exportable(cfg):
    """Raise a ValueError naming the setting when ``cfg`` asks for something the export lacks."""
    if cfg.TEST.AUG.ENABLED:
        raise ValueError("test-time augmentation (TEST.AUG.ENABLED=True) cannot be exported: the exported graph "
                         "runs one forward at one size; set TEST.AUG.ENABLED False")
    if cfg.MODEL.META_ARCHITECTURE != "MaskFormer":
        raise ValueError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} cannot be exported (only MaskFormer)")
    if cfg.MODEL.BACKBONE.NAME != "AutoFocusFormer":
        raise ValueError(f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r} cannot be exported (only AutoFocusFormer)")


def _sort_as_topk(self, stable=None, dim=-1, descending=False):
    """ONNX translation of ``aten.sort.stable``: a full ``TopK`` (ties to the lower index)."""
    from onnxscript import opset18 as op

    n = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]), axis=0)
    return op.TopK(self, n, axis=dim, largest=descending, sorted=True)


def _amax(self, dim=(), keepdim=False):
    """ONNX translation of ``aten.amax``, including the reduction over all dimensions
    (``dim=()``, from ``x.amax()``), which onnxscript's translation does not accept."""
    from onnxscript import opset18 as op

    if not dim:
        return op.ReduceMax(self, keepdims=int(keepdim))
    return op.ReduceMax(self, op.Constant(value_ints=list(dim)), keepdims=int(keepdim))


def onnx_translations():
    """The ``custom_translation_table`` of ``torch.onnx.export`` for the exported programs."""
    return {torch.ops.aten.sort.stable: _sort_as_topk, torch.ops.aten.amax.default: _amax}


def _valid_sizes(backbone, example_size, lo, hi, div):
    """For each input height ``lo..hi`` (step ``div``): the [min, max] width whose sizes take the
    example's branches (global or local attention per stage), or None."""
    pattern = backbone.global_attention(*example_size)
    table = {}
    for height in range(lo, hi + 1, div):
        widths = [w for w in range(lo, hi + 1, div) if backbone.global_attention(height, w) == pattern]
        table[str(height)] = [min(widths), max(widths)] if widths else None
    return table


def _input_range(program, divisibility):
    """(min, max) input side of the exported program, from its range constraints."""
    image = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image")
    sides = []
    for size in image.meta["val"].shape[2:]:
        if isinstance(size, int):
            sides.append((size, size))
        else:
            r = program.range_constraints[size.node.expr]
            sides.append((int(r.lower), int(min(r.upper, MAX_SIDE))))
    lo = max(s[0] for s in sides)
    return -(-lo // divisibility) * divisibility, min(s[1] for s in sides)


def export_program(model, cfg, example_size=(256, 256), config_file=""):
    """Export ``model`` (a MaskFormer in eval mode) with ``torch.export``.

    Args:
        model: the eager model; cfg: its config.
        example_size: (H, W) of the example input, multiples of the size divisibility; the
            graph is exact at every size that takes the same branches (global or local
            attention per stage) as the example: the settings record the range and, per
            height, the widths that do (``valid_widths``).
        config_file: recorded in the settings.
    Returns:
        (the program with the clusten ops decomposed, the settings of ``model.json`` less the format)
    """
    check_exportable(cfg)
    div = model.size_divisibility
    if div <= 0 or example_size[0] % div or example_size[1] % div:
        raise ValueError(f"example size {example_size} must be a multiple of the size divisibility {div}")
    graph = InferenceGraph(model).eval()
    example = torch.zeros(1, len(cfg.MODEL.PIXEL_MEAN), *example_size, device=model.device)
    dims = [div * torch.export.Dim(name, min=1, max=MAX_SIDE // div) for name in ("rows", "cols")]
    with torch.no_grad():
        program = torch.export.export(graph, (example,), dynamic_shapes={"image": {2: dims[0], 3: dims[1]}},
                                      strict=False)
        min_size, max_size = _input_range(program, div)
        program = program.run_decompositions(clusten.decompositions())
    settings = {
        "config": config_file,
        "input": {
            "format": cfg.INPUT.FORMAT,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": div,
            "min_size": min_size,
            "max_size": max_size,
            "example_size": list(example_size),
            "valid_widths": _valid_sizes(model.backbone, example_size, min_size, max_size, div),
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        },
        "outputs": list(runtime.OUTPUT_NAMES),
        "postprocess": model.postprocess_settings(),
    }
    return program, settings


def save(program, settings, output_dir, fmt):
    """Write ``program`` as ``fmt`` ("torch_export": the program; "onnx": converted by the
    dynamo-based ``torch.onnx.export``) and its ``model.json`` to ``output_dir``.
    Returns the path of the model file."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, runtime.MODEL_FILES[fmt])
    if fmt == "torch_export":
        torch.export.save(program, path)
    else:
        onnx_program = torch.onnx.export(
            program, dynamo=True, input_names=["image"], output_names=settings["outputs"],
            custom_translation_table=onnx_translations(), verbose=False,
        )
        onnx_program.save(path)
    with open(os.path.join(output_dir, runtime.SETTINGS_FILE), "w") as f:
        json.dump({**settings, "format": fmt}, f, indent=2)
    return path


def export_model(model, cfg, output_dir, fmt, example_size=(256, 256), config_file=""):
    """Export ``model`` (a MaskFormer in eval mode) as ``fmt`` to ``output_dir``
    (``export_program``, then ``save``). Returns the path of the model file."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    program, settings = export_program(model, cfg, example_size, config_file)
    return save(program, settings, output_dir, fmt)
