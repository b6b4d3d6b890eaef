#!/usr/bin/env python
"""FLOPs, activations, parameters and structure of a model, with fvcore.

Examples::

    python tools/analyze_model.py --config-file CFG --tasks flop --use-fixed-input-size
    python tools/analyze_model.py --config-file CFG --tasks flop --use-fixed-input-size \\
        --exclude-custom-ops          # the original's count
    python tools/analyze_model.py --config-file CFG --tasks parameter structure

FLOPs follow fvcore's convention (one multiply-add counts as one flop, elementwise ops are
ignored).  Unlike the original, which traced the clusten CUDA ops and the KeOps KNN as
unknown nodes and so left them out, the count includes the clusten ops (every neighbourhood
gather, the fused cluster attention, the grid models' multi-scale deformable attention and every
KNN search), with the rules of ``clusten.flops``.

``--exclude-custom-ops`` leaves all of them out again.  Window attention through
``F.scaled_dot_product_attention`` (Focal, Swin) is always counted: logits and weighted sum,
``batch * L * S * (E + Ev)`` for a query ``batch x L x E`` and a value ``batch x S x Ev``.
The result also gives the total without the matrix products (``matmul``/``bmm``/``einsum``/
``scaled_dot_product_attention``: the attention logits and weighted sums), which is how thop,
the counter of the SegFormer and BoostFormer READMEs, counts (conv and linear layers only, and
the norms).  ``--use-fixed-input-size`` runs on zeros of ``INPUT.CROP.SIZE`` instead of the
test set's images; those inputs are all the same, so one is analysed whatever ``-n`` says.
"""
import argparse
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
import clusten.flops  # noqa: E402
from aff_seg.checkpoint import AFFCheckpointer, check_weights  # noqa: E402
from aff_seg.config import ConfigError  # noqa: E402
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.export import TracingAdapter  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.analysis import FlopCountAnalysis  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from fvcore.nn import ActivationCountAnalysis, flop_count_table, parameter_count  # noqa: E402
from fvcore.nn import parameter_count_table  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402

logger = logging.getLogger("aff_seg.analyze_model")


def attention_flop(inputs, outputs):
    """``F.scaled_dot_product_attention``: query ... x L x E, key ... x S x E, value ... x S x Ev:
    the logits and the weighted sum, prod(...) * L * S * (E + Ev)."""
    query, key, value = (get_shape(inputs[i]) for i in range(3))
    return prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


MATRIX_PRODUCT_OPS = ("matmul", "bmm", "einsum", "scaled_dot_product_attention")  # fvcore's operator names


def flop_analysis(model, inputs, count_custom_ops=True):
    """fvcore FLOP analysis of ``model`` on ``inputs`` (detectron2 ``list[dict]``).

    Args:
        model: a detectron2 model in eval mode.
        inputs: the model's inputs.
        count_custom_ops: count the clusten ops and the KNN searches (False: ignore them,
            as the original's count did).

    Returns:
        a ``FlopCountAnalysis`` whose statistics are already computed; fvcore's per-operator
        warnings are off (``do_flop`` reports the operators without a FLOP rule in one line).
    """
    analysis = FlopCountAnalysis(model, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.set_op_handle(**{"aten::scaled_dot_product_attention": attention_flop})
    handles = clusten.flops.FLOP_HANDLES
    analysis.set_op_handle(**(handles if count_custom_ops else dict.fromkeys(handles)))
    analysis.total()  # traces now
    return analysis


def activation_analysis(model, inputs, count_custom_ops=True):
    """fvcore activation count (outputs of convolutions, matmuls and, with
    ``count_custom_ops``, of the clusten ops), computed like ``flop_analysis``."""
    wrapper = TracingAdapter(model, inputs, allow_non_tensor=True)
    analysis = ActivationCountAnalysis(wrapper, wrapper.flattened_inputs)
    handles = clusten.flops.ACTIVATION_HANDLES
    analysis.set_op_handle(**(handles if count_custom_ops else dict.fromkeys(handles)))
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
        "Not counted (no FLOP rule, as in fvcore): "
        + (", ".join(f"{k} x{v}" for k, v in sorted(result["unsupported_ops"].items())) or "none")
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
