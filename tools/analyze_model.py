#!/usr/bin/env python
"""FLOPs, activations, parameters and structure of a model, with fvcore.

Examples::

    python tools/analyze_model.py --config-file CFG --tasks flop --use-fixed-input-size
    python tools/analyze_model.py --config-file CFG --tasks flop --use-fixed-input-size \\
        --exclude-custom-ops          # the original's count
    python tools/analyze_model.py --config-file CFG --tasks parameter structure

FLOPs follow fvcore's convention (one multiply-add counts as one flop, elementwise ops are
ignored).  Unlike the original, which traced the clusten CUDA ops and the KeOps KNN as
unknown nodes and so left them out, the count includes

* the clusten gather primitives (``clusten::gather_dot``: ``out.numel() * c``;
  ``clusten::gather_sum``: ``out.numel() * m``; ``clusten::scatter_sum``: ``w.numel() * c``),
  which is every neighbourhood attention (qk and av), PointConv's weighted features, the
  weighted gathers of Shepard interpolation and the point deformable attention;
* the fused cluster attention (``clusten::cluster_attention_fwd``: logits and weighted sum
  over the M neighbours and the blank token, ``2 * b * h * n * (M + 1) * c``);
* the grid models' multi-scale deformable attention (``clusten::ms_deform_attn``: bilinear
  sampling and weighting, ``5 * b * q * heads * levels * points * d``);
* every KNN search, as the brute-force distance computation ``b * n * n_ * d`` (query
  ``b x n x d`` against database ``b x n_ x d``); the selection of the k nearest is not
  counted, as fvcore counts no sort.

``--exclude-custom-ops`` leaves all of them out again.  The result also gives the total without the
matrix products (``matmul``/``bmm``/``einsum``: the attention logits and weighted sums), which is how
thop, the counter of the SegFormer and BoostFormer READMEs, counts (conv and linear layers only, and
the norms).  ``--use-fixed-input-size`` runs
on zeros of ``INPUT.CROP.SIZE`` instead of the test set's images; those inputs are all the
same, so one is analysed whatever ``-n`` says.
"""
import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections import Counter
from math import prod

import numpy as np
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aff_seg  # noqa: E402  (compat fixes before detectron2)
import clusten  # noqa: E402
from aff_seg.checkpoint import AFFCheckpointer, check_weights  # noqa: E402
from aff_seg.config import ConfigError  # noqa: E402
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.export import TracingAdapter  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.analysis import FlopCountAnalysis  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from fvcore.nn import ActivationCountAnalysis, flop_count_table, parameter_count  # noqa: E402
from fvcore.nn import parameter_count_table  # noqa: E402
from fvcore.nn.jit_handles import generic_activation_jit, get_shape  # noqa: E402

logger = logging.getLogger("aff_seg.analyze_model")

# -- counting the custom ops --------------------------------------------------------------

KNN_OP = "aff_seg_analysis::knn"


def gather_dot_flop(inputs, outputs):
    """``x`` g x n x r x c -> out g x n x m x r: one multiply-add per (out, c)."""
    return prod(get_shape(outputs[0])) * get_shape(inputs[0])[-1]


def gather_sum_flop(inputs, outputs):
    """``w`` g x n x m x r -> out g x n x r x c: one multiply-add per (out, m)."""
    return prod(get_shape(outputs[0])) * get_shape(inputs[0])[2]


def scatter_sum_flop(inputs, outputs):
    """``w`` g x n x m x r, ``x`` g x n x r x c: one multiply-add per (w, c)."""
    return prod(get_shape(inputs[0])) * get_shape(inputs[1])[-1]


def cluster_attention_flop(inputs, outputs):
    """Fused attention, ``query`` b x h x n x c, ``nbhd_idx`` b x n x M: the logits and the
    weighted sum over M neighbours plus the blank token, 2 * b * h * n * (M + 1) * c."""
    b, h, n, c = get_shape(inputs[0])
    return 2 * b * h * n * (get_shape(inputs[3])[-1] + 1) * c


def ms_deform_attn_flop(inputs, outputs):
    """``value`` b x s x heads x d, locations b x q x heads x levels x points x 2."""
    return clusten.ms_deform_attn_flop(get_shape(inputs[0]), get_shape(inputs[2]))


def knn_flop(inputs, outputs):
    """``query`` b x n x d, ``database`` b x n_ x d: brute-force distances, b * n * n_ * d."""
    b, n, d = get_shape(inputs[0])
    return b * n * get_shape(inputs[1])[1] * d


MATRIX_PRODUCT_OPS = ("matmul", "bmm", "einsum")  # fvcore's operator names

FLOP_HANDLES = {
    "clusten::gather_dot": gather_dot_flop,
    "clusten::gather_sum": gather_sum_flop,
    "clusten::scatter_sum": scatter_sum_flop,
    "clusten::cluster_attention_fwd": cluster_attention_flop,
    "clusten::ms_deform_attn": ms_deform_attn_flop,
    KNN_OP: knn_flop,
}
ACTIVATION_HANDLES = {
    name: generic_activation_jit()
    for name in ("clusten::gather_dot", "clusten::gather_sum", "clusten::scatter_sum",
                 "clusten::cluster_attention_fwd", "clusten::ms_deform_attn")
}

_plain_knn = clusten.knn


@torch.library.custom_op(KNN_OP, mutates_args=())
def _knn_op(query: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _plain_knn(query, database, k, return_dist=True)


@_knn_op.register_fake
def _(query, database, k):
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape, dtype=torch.int64), query.new_empty(shape, dtype=torch.float32)


def _knn_traced_as_one_op(query, database, k, return_dist=False):
    idx, dist = _knn_op(query, database, k)
    return (idx, dist) if return_dist else idx


@contextlib.contextmanager
def knn_as_one_op():
    """While active, ``clusten.knn`` runs as the single custom op ``KNN_OP``, so the tracer
    sees one node per KNN search (instead of its elementwise and sort ops) and
    ``knn_flop`` can count it.  Callers reach the KNN as ``clusten.knn``."""
    clusten.knn = _knn_traced_as_one_op
    try:
        yield
    finally:
        clusten.knn = _plain_knn


def flop_analysis(model, inputs, count_custom_ops=True):
    """fvcore FLOP analysis of ``model`` on ``inputs`` (detectron2 ``list[dict]``).

    Args:
        model: a detectron2 model in eval mode.
        inputs: the model's inputs.
        count_custom_ops: count the clusten ops and the KNN searches (False: ignore them,
            as the original's count did).

    Returns:
        a ``FlopCountAnalysis`` whose statistics are already computed.
    """
    analysis = FlopCountAnalysis(model, inputs)
    if count_custom_ops:
        analysis.set_op_handle(**FLOP_HANDLES)
    else:
        analysis.set_op_handle(**{name: None for name in FLOP_HANDLES})
    with knn_as_one_op():
        analysis.total()  # traces now, while the KNN is one op
    return analysis


def activation_analysis(model, inputs, count_custom_ops=True):
    """fvcore activation count (outputs of convolutions, matmuls and, with
    ``count_custom_ops``, of the clusten ops), computed like ``flop_analysis``."""
    wrapper = TracingAdapter(model, inputs, allow_non_tensor=True)
    analysis = ActivationCountAnalysis(wrapper, wrapper.flattened_inputs)
    handles = ACTIVATION_HANDLES if count_custom_ops else {n: None for n in ACTIVATION_HANDLES}
    analysis.set_op_handle(**handles, **{KNN_OP: None})
    with knn_as_one_op():
        analysis.total()
    return analysis


# -- model and inputs ---------------------------------------------------------------------


def setup_cfg(config_file, opts=()):
    """Config from a file and ``KEY VALUE`` overrides; runs on the CPU without CUDA."""
    cfg = aff_seg.load_config(config_file, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def build_loaded_model(cfg):
    """``build_model`` plus the weights of ``MODEL.WEIGHTS`` (random init when empty)."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AFFCheckpointer(model, strict=cfg.MODEL.WEIGHTS_STRICT).load(cfg.MODEL.WEIGHTS)
    return model


def fixed_size_inputs(height, width, batch_size=1, fill=None, seed=0):
    """``batch_size`` detectron2 inputs of ``3 x height x width`` images.

    Args:
        fill: a constant pixel value; None draws uniform random pixels in [0, 255).
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch_size):
        if fill is None:
            image = torch.rand(3, height, width, generator=generator) * 255
        else:
            image = torch.full((3, height, width), float(fill))
        inputs.append({"image": image, "height": height, "width": width})
    return inputs


def analysis_inputs(cfg, num_inputs, use_fixed_input_size):
    """Yield the batches (of one image) to analyse."""
    if use_fixed_input_size:
        size = cfg.INPUT.CROP.SIZE[0]
        yield fixed_size_inputs(size, size, fill=0)
        return
    if not len(cfg.DATASETS.TEST):
        raise ValueError("DATASETS.TEST is empty: pass --use-fixed-input-size")
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    for _, batch in zip(range(num_inputs), loader):
        yield batch


# -- tasks --------------------------------------------------------------------------------


def _strip_wrapper(by_module):
    """fvcore names modules inside detectron2's TracingAdapter ``model.<name>``."""
    return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in by_module.items()}


def do_flop(model, cfg, args):
    totals, by_operator = [], Counter()
    first = None
    for idx, inputs in enumerate(analysis_inputs(cfg, args.num_inputs, args.use_fixed_input_size)):
        analysis = flop_analysis(model, inputs, count_custom_ops=not args.exclude_custom_ops)
        if idx > 0:
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_operator += analysis.by_operator()
        totals.append(analysis.total())
        if first is None:
            first = analysis
        logger.debug(f"input {idx}: {analysis.total() / 1e9:.3f} GFLOPs")
    if first is None:
        raise ValueError("no input to analyse")
    logger.info("FLOPs table of the first input:\n" + flop_count_table(first, max_depth=3))
    modules = _strip_wrapper(first.by_module())
    result = {
        "gflops": float(np.mean(totals) / 1e9),
        "gflops_std": float(np.std(totals) / 1e9),
        "num_inputs": len(totals),
        "custom_ops_counted": not args.exclude_custom_ops,
        "gflops_by_operator": {k: v / len(totals) / 1e9 for k, v in sorted(by_operator.items())},
        "gflops_without_matmul": sum(
            v for k, v in by_operator.items() if k not in MATRIX_PRODUCT_OPS
        ) / len(totals) / 1e9,
        "gflops_by_module": {
            name: modules[name] / 1e9 for name in ("", "backbone", "sem_seg_head") if name in modules
        },
        "unsupported_ops": dict(first.unsupported_ops()),
    }
    logger.info(
        "Average GFLOPs per operator: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in result["gflops_by_operator"].items())
    )
    logger.info(
        f"Total GFLOPs: {result['gflops']:.2f} ± {result['gflops_std']:.2f} "
        f"({result['gflops_without_matmul']:.2f} without the matrix products)"
    )
    return result


def do_activation(model, cfg, args):
    totals, by_operator = [], Counter()
    for inputs in analysis_inputs(cfg, args.num_inputs, args.use_fixed_input_size):
        analysis = activation_analysis(model, inputs, count_custom_ops=not args.exclude_custom_ops)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_operator += analysis.by_operator()
        totals.append(analysis.total())
    result = {
        "mega_activations": float(np.mean(totals) / 1e6),
        "mega_activations_std": float(np.std(totals) / 1e6),
        "mega_activations_by_operator": {
            k: v / len(totals) / 1e6 for k, v in sorted(by_operator.items())
        },
    }
    logger.info(
        f"Total activations (M): {result['mega_activations']:.2f} ± "
        f"{result['mega_activations_std']:.2f}"
    )
    return result


def do_parameter(model, cfg, args):
    logger.info("Parameters:\n" + parameter_count_table(model, max_depth=args.max_depth))
    counts = parameter_count(model)
    return {
        "parameters": counts[""],
        "parameters_by_module": {k: counts[k] for k in ("backbone", "sem_seg_head") if k in counts},
    }


def do_structure(model, cfg, args):
    logger.info("Model structure:\n" + str(model))
    return {"structure": str(model)}


TASKS = {
    "flop": do_flop,
    "activation": do_activation,
    "parameter": do_parameter,
    "structure": do_structure,
}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--tasks", choices=sorted(TASKS), nargs="+", required=True, help="what to report"
    )
    parser.add_argument(
        "-n", "--num-inputs", type=int, default=100, help="test-set images to average over"
    )
    parser.add_argument(
        "--use-fixed-input-size",
        action="store_true",
        help="analyse zeros of INPUT.CROP.SIZE instead of test-set images",
    )
    parser.add_argument(
        "--exclude-custom-ops",
        action="store_true",
        help="leave the clusten ops and KNN searches out of the counts (the original's count)",
    )
    parser.add_argument("--max-depth", type=int, default=5, help="depth of the parameter table")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="aff_seg")
    if args.num_inputs < 1:
        raise ValueError(f"--num-inputs must be >= 1, got {args.num_inputs}")
    try:  # one line naming the key or file, before the model is built
        cfg = setup_cfg(args.config_file, args.opts)
        check_weights(cfg.MODEL.WEIGHTS)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"analyze_model.py: error: {e}")
    model = build_loaded_model(cfg)
    model.eval()
    results = {"config_file": args.config_file}
    with torch.no_grad():
        for task in args.tasks:
            results.update(TASKS[task](model, cfg, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
