#!/usr/bin/env python
"""Convert an official AFF ImageNet classification checkpoint to detectron2's format.

Usage:
    python tools/convert-pretrained-model-to-d2.py aff_mini.pth aff_mini.pkl
then set ``MODEL.WEIGHTS: /path/to/aff_mini.pkl`` (``INPUT.FORMAT: RGB``).

As the original tool: the ``model`` entry is kept unchanged (tensors, no renaming) and pickled
as ``{"model": ..., "__author__": "third_party", "matching_heuristics": True}``. The input is
read with ``weights_only`` loading, so nothing in it is executed. (The ``.pth`` also loads
directly through ``MODEL.WEIGHTS`` with ``AFFCheckpointer``; converting is optional.)
"""
import argparse
import pickle

import aff_seg  # noqa: F401  (detectron2 compatibility fixes first)
from aff_seg.checkpoint import load_weights_file


def convert(src, dst):
    """Write ``src``'s ``model`` state_dict to ``dst`` as a detectron2 third-party pickle."""
    loaded = load_weights_file(src)
    if not isinstance(loaded, dict) or "model" not in loaded:
        raise ValueError(f"{src}: expected a checkpoint dict with a 'model' entry")
    with open(dst, "wb") as f:
        pickle.dump({"model": loaded["model"], "__author__": "third_party", "matching_heuristics": True}, f)
    return len(loaded["model"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="classification checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 weights (.pkl)")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.input, args.output)} tensors to {args.output}")


if __name__ == "__main__":
    main()
