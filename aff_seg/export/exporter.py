"""Export the inference graph of a segmentation model: ``torch.export`` program or ONNX file.

The graph maps a normalised, padded ``1 x 3 x H x W`` float32 image to the raw outputs the
post-processing needs, with H and W dynamic multiples of the size divisibility:

* ``MaskFormer`` (AFF, grid Mask2Former and FASeg on any backbone): ``runtime.MASK_OUTPUTS``,
  class and mask logits, plus ``runtime.TOKEN_OUTPUTS``, the kept token positions of every
  stage, when the backbone returns tokens;
* ``CheckedSemanticSegmentor`` with an all-MLP head (SegFormer, BoostFormer):
  ``runtime.SEMANTIC_OUTPUTS``, the class logits at the head's stride. The clusten
ops are replaced by their PyTorch forms (``clusten.decompositions``), so the program needs
torch alone and the ONNX file standard operators; ``torch.sort(stable=True)`` becomes ONNX
``TopK``, whose ties go to the lower index as well.

Not exported: training (losses, matcher), test-time augmentation, batching (one image per call).
"""
import json
import os

import torch
import torch.fx.experimental._config as shape_config
from torch import nn

import clusten

from . import runtime

__all__ = ["InferenceGraph", "SemanticGraph", "check_exportable", "export_program", "save", "export_model", "FORMATS"]

FORMATS = tuple(runtime.MODEL_FILES)
MAX_SIDE = 2048  # the largest input side the graph is exported for
# meta-architecture -> the semantic heads it exports with (None: any)
EXPORTABLE_HEADS = {
    "MaskFormer": None, "CheckedSemanticSegmentor": ("SegFormerHead", "SegFormerConvHead", "BoostFormerHead")}


class InferenceGraph(nn.Module):
    """``MaskFormer`` inference up to the raw outputs: image ``1 x 3 x H x W`` (normalised,
    padded) -> tuple in ``output_names`` order (``pred_logits`` ``1 x Q x (K+1)``,
    ``pred_masks`` ``1 x Q x H/4 x W/4``, and for a token backbone ``res{i}_pos`` ``1 x n_i x 2``)."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        tokens = getattr(model.backbone, "output_format", "maps") == "tokens"
        self.output_names = runtime.MASK_OUTPUTS + (runtime.TOKEN_OUTPUTS if tokens else ())
        # dense maps: trace sizes without specialising them at 1, so that FASeg's top-k cell count
        # (1 below 64 cells at stride 32, more above) stays one expression of the input size
        self.size_oblivious = not tokens
        self.size_divisibility = model.size_divisibility
        self.postprocess = model.postprocess_settings()

    def forward(self, image):
        features = self.backbone(image)
        out = self.sem_seg_head(features)
        return tuple(out[k] if k in out else features[k] for k in self.output_names)


class SemanticGraph(nn.Module):
    """``CheckedSemanticSegmentor`` inference up to the head's logits: image ``1 x 3 x H x W``
    (normalised, padded) -> (``sem_seg_logits`` ``1 x K x H/s x W/s``,) at the head's
    ``common_stride`` s; the runtime upsamples them to the input as the head does."""

    output_names = runtime.SEMANTIC_OUTPUTS
    size_oblivious = False

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        self.size_divisibility = model.backbone.size_divisibility  # as SemanticSegmentor pads
        self.postprocess = {"common_stride": model.sem_seg_head.common_stride}

    def forward(self, image):
        return (self.sem_seg_head.layers(self.backbone(image)),)


def check_exportable(cfg):
    """Raise a ValueError naming the setting when ``cfg`` asks for something the export lacks."""
    if cfg.TEST.AUG.ENABLED:
        raise ValueError("test-time augmentation (TEST.AUG.ENABLED=True) cannot be exported: the exported graph "
                         "runs one forward at one size; set TEST.AUG.ENABLED False")
    if cfg.TEST.SLIDING_WINDOW.ENABLED:
        raise ValueError("sliding-window inference (TEST.SLIDING_WINDOW.ENABLED=True) cannot be exported: the exported "
                         "graph runs the whole image at once; set TEST.SLIDING_WINDOW.ENABLED False")
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in EXPORTABLE_HEADS:
        raise ValueError(f"MODEL.META_ARCHITECTURE={arch!r} cannot be exported (only {', '.join(EXPORTABLE_HEADS)})")
    if EXPORTABLE_HEADS[arch] and cfg.MODEL.SEM_SEG_HEAD.NAME not in EXPORTABLE_HEADS[arch]:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NAME={cfg.MODEL.SEM_SEG_HEAD.NAME!r} cannot be exported with {arch} (only "
            f"{', '.join(EXPORTABLE_HEADS[arch])}: the graph ends at their stride-4 logits)")


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


def _pooling_matrix(size, out_size, like):
    """``out_size x size`` matrix (dtype of ``like``) of adaptive average pooling along one axis:
    row ``i`` averages ``[floor(i * size / out_size), ceil((i + 1) * size / out_size))``, as PyTorch."""
    from onnxscript import opset18 as op

    i = op.Range(op.Constant(value_int=0), op.Constant(value_int=out_size), op.Constant(value_int=1))
    start = op.Unsqueeze(op.Div(op.Mul(i, size), out_size), op.Constant(value_ints=[1]))
    end = op.Unsqueeze(op.Div(op.Add(op.Mul(op.Add(i, 1), size), out_size - 1), out_size),
                       op.Constant(value_ints=[1]))
    j = op.Range(op.Constant(value_int=0), op.Squeeze(size), op.Constant(value_int=1))
    inside = op.And(op.GreaterOrEqual(j, start), op.Less(j, end))
    return op.Div(op.CastLike(inside, like), op.CastLike(op.Sub(end, start), like))


def _adaptive_avg_pool2d(self, output_size):
    """ONNX translation of ``aten._adaptive_avg_pool2d`` (``b x c x H x W -> b x c x P x Q``) for
    any input size: a pooling matrix per axis, built from the input's shape. torch.onnx's own
    decomposition fixes the window lengths at the example's size, so other sizes came out wrong."""
    from onnxscript import opset18 as op

    shape = op.Shape(self)
    rows = _pooling_matrix(op.Gather(shape, op.Constant(value_ints=[2]), axis=0), output_size[0], self)
    cols = _pooling_matrix(op.Gather(shape, op.Constant(value_ints=[3]), axis=0), output_size[1], self)
    return op.MatMul(op.MatMul(rows, self), op.Transpose(cols, perm=[1, 0]))


def onnx_translations():
    """The ``custom_translation_table`` of ``torch.onnx.export`` for the exported programs."""
    return {torch.ops.aten.sort.stable: _sort_as_topk, torch.ops.aten.amax.default: _amax,
            torch.ops.aten._adaptive_avg_pool2d.default: _adaptive_avg_pool2d}


def _valid_sizes(backbone, example_size, lo, hi, div):
    """For each input height ``lo..hi`` (step ``div``): the [min, max] width whose sizes take the
    example's branches (``AFF.size_branches``), or None."""
    pattern = backbone.size_branches(*example_size)
    table = {}
    for height in range(lo, hi + 1, div):
        widths = [w for w in range(lo, hi + 1, div) if backbone.size_branches(height, w) == pattern]
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
    """Export ``model`` (a MaskFormer or CheckedSemanticSegmentor in eval mode) with ``torch.export``.

    Args:
        model: the eager model; cfg: its config.
        example_size: (H, W) of the example input, multiples of the size divisibility; the
            graph is exact at every size that takes the same branches as the example (AFF:
            ``AFF.size_branches``): the settings record the range and, for AFF,
            per height the widths that do (``valid_widths``).
        config_file: recorded in the settings.
    Returns:
        (the program with the clusten ops decomposed, the settings of ``model.json`` less the format)
    """
    check_exportable(cfg)
    graph = (SemanticGraph if cfg.MODEL.META_ARCHITECTURE == "CheckedSemanticSegmentor" else InferenceGraph)(model)
    graph.eval()
    div = graph.size_divisibility
    if div <= 0 or example_size[0] % div or example_size[1] % div:
        raise ValueError(f"example size {example_size} must be a multiple of the size divisibility {div}")
    example = torch.zeros(1, len(cfg.MODEL.PIXEL_MEAN), *example_size, device=model.device)
    # at least 2 cells of the size divisibility a side: a map of one row or column (stride 32)
    # would be specialised as a broadcast
    dims = [div * torch.export.Dim(name, min=2, max=MAX_SIDE // div) for name in ("rows", "cols")]
    with torch.no_grad(), shape_config.patch(backed_size_oblivious=graph.size_oblivious):
        program = torch.export.export(graph, (example,), dynamic_shapes={"image": {2: dims[0], 3: dims[1]}},
                                      strict=False)
        min_size, max_size = _input_range(program, div)
        program = program.run_decompositions(clusten.decompositions())
    settings = {
        "config": config_file,
        "input": {
            "format": cfg.INPUT.FORMAT,
            "channels": example.shape[1],
            "dtype": str(example.dtype).removeprefix("torch."),
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": div,
            "min_size": min_size,
            "max_size": max_size,
            "example_size": list(example_size),
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        },
        "outputs": list(graph.output_names),
        "postprocess": graph.postprocess,
    }
    if hasattr(model.backbone, "size_branches"):  # AFF: the sizes that take the example's branches
        settings["input"]["valid_widths"] = _valid_sizes(model.backbone, example_size, min_size, max_size, div)
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
        # optimize=False: onnxscript's optimizer drops an Add of a constant within 1e-8 of zero as a
        # no-op (onnxscript 0.7), which removes the 1e-11 of the Shepard weights 1 / (d^2p + 1e-11)
        # and gives inf/NaN where a sample sits on a token; ONNX Runtime optimises the graph itself
        onnx_program = torch.onnx.export(
            program, dynamo=True, input_names=["image"], output_names=settings["outputs"],
            custom_translation_table=onnx_translations(), optimize=False, verbose=False,
        )
        onnx_program.save(path)
    with open(os.path.join(output_dir, runtime.SETTINGS_FILE), "w") as f:
        json.dump({**settings, "format": fmt}, f, indent=2)
    return path


def export_model(model, cfg, output_dir, fmt, example_size=(256, 256), config_file=""):
    """Export ``model`` as ``fmt`` to ``output_dir`` (``export_program``, then ``save``).
    Returns the path of the model file."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    program, settings = export_program(model, cfg, example_size, config_file)
    return save(program, settings, output_dir, fmt)
