#!/usr/bin/env python
"""Export a model's inference graph for deployment: a ``torch.export`` program or an ONNX file.

    python tools/export_model.py --config-file configs/ade20k/.../maskformer2_aff_mini_bs32_80k.yaml \
        --format onnx --output export/aff_mini_ade MODEL.WEIGHTS aff_mini_ade.pth

Writes ``model.pt2`` or ``model.onnx`` and ``model.json`` (config, input format, normalisation,
size divisibility, exported size range, post-processing settings) to ``--output``. Run the
result with ``aff_seg.export.runtime.ExportedModel`` or ``demo/demo.py --exported DIR``; what is
and is not exported: README, "Deploy".
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import aff_seg  # noqa: E402,F401  (compat fixes before detectron2)
from aff_seg.checkpoint import AFFCheckpointer  # noqa: E402
from aff_seg.config import load_config  # noqa: E402
from aff_seg.export.exporter import FORMATS, check_exportable, export_model  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

logger = logging.getLogger("aff_seg.export")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, metavar="DIR", help="directory of the exported model")
    parser.add_argument("--example-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="example input size (multiple of the size divisibility); the graph is exact at every "
                             "size that takes the example's branches (model.json records the range)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    check_exportable(cfg)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AFFCheckpointer(model, strict=cfg.MODEL.WEIGHTS_STRICT).load(cfg.MODEL.WEIGHTS)
    path = export_model(model, cfg, args.output, args.format, tuple(args.example_size), config_file=args.config_file)
    logger.info("exported %s", path)
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export_model: {e}")
