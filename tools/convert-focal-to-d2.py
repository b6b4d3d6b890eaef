#!/usr/bin/env python
"""Convert an official Focal Transformer ImageNet classification checkpoint to detectron2's format.

Usage:
    python tools/convert-focal-to-d2.py focal-tiny-is224.pth focal_tiny.pkl
then set ``MODEL.WEIGHTS: /path/to/focal_tiny.pkl`` with ``MODEL.BACKBONE.NAME: D2FocalTransformer``
(or ``D2FocalTransformerTokens``) and the matching ``MODEL.FOCAL.*`` size.

The input may be the bare state_dict or a dict with it under ``model``; it is read with
``weights_only`` loading, so nothing in it is executed. The classifier (``head.*``) and the final
``norm.*`` are dropped, every other tensor is written under ``backbone.`` unchanged, and
``matching_heuristics`` is off, so no key is guessed. The backbone's output norms
``norm0..3`` are new (not in the file). The ``.pth`` also loads directly through
``MODEL.WEIGHTS`` with ``AFFCheckpointer``; converting is optional.
"""
import argparse
import pickle

import aff_seg  # noqa: F401  (detectron2 compatibility fixes first)
from aff_seg.checkpoint import load_weights_file
from aff_seg.modeling.backbone.focal import focal_classification_state_dict


def convert(src, dst):
    """Write ``src``'s backbone tensors to ``dst`` as detectron2 weights.

    Returns:
        ``(written, dropped)``: the number of tensors written and the dropped key names.
    """
    backbone, dropped = focal_classification_state_dict(load_weights_file(src))
    if backbone is None:
        raise ValueError(
            f"{src}: not a Focal Transformer classification checkpoint (no top-level "
            "'patch_embed.proj.weight' and 'layers.0.blocks.0.attn.relative_position_bias_table')"
        )
    model = {"backbone." + k: v for k, v in backbone.items()}
    with open(dst, "wb") as f:
        pickle.dump({"model": model, "__author__": "Focal-Transformer", "matching_heuristics": False}, f)
    return len(model), dropped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="classification checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 weights (.pkl)")
    args = parser.parse_args(argv)
    written, dropped = convert(args.input, args.output)
    print(f"wrote {written} tensors to {args.output} under 'backbone.'; dropped the classifier: {', '.join(dropped)}; "
          "new in the detectron2 backbone (randomly initialised): the output norms norm0..3")


if __name__ == "__main__":
    main()
