#!/usr/bin/env python
"""Convert a SegFormer or BoostFormer checkpoint to a detectron2 ``.pkl`` under this project's names.

Usage:
    python tools/convert-segformer-to-d2.py INPUT OUTPUT.pkl

INPUT is a HuggingFace ``save_pretrained`` directory (or its ``model.safetensors`` / ``pytorch_model.bin``;
task models or the base ``SegformerModel``), an NVlabs/SegFormer (mmseg 0.x) or MMSegmentation (>= 0.17)
segmentation ``.pth``, or an ImageNet ``mit_b*.pth`` encoder (NVlabs or MMSegmentation names). Converting is
optional: ``MODEL.WEIGHTS`` takes all of these directly. The output holds ``backbone.*`` (and
``sem_seg_head.*``) tensors for ``D2MixVisionTransformer``/``D2BoostFormer`` with ``SegFormerHead``/
``SegFormerConvHead`` (MMSegmentation's head)/``BoostFormerHead``; the keys dropped by design (unused convs,
classifiers) are printed. Nothing in the input is executed (weights-only reading).
"""
import argparse
import os
import pickle

import aff_seg  # noqa: F401  (detectron2 compatibility fixes first)
from aff_seg.modeling.backbone import segformer_weights
from aff_seg.checkpoint import HF_WEIGHT_FILES, load_weights_file


def convert(src, dst):
    """Convert ``src`` to ``dst``; returns a one-line summary."""
    if os.path.isdir(src):
        found = [os.path.join(src, n) for n in HF_WEIGHT_FILES if os.path.isfile(os.path.join(src, n))]
        if not found:
            raise FileNotFoundError(f"{src}: a directory without {' or '.join(HF_WEIGHT_FILES)}")
        src = found[0]
    loaded = load_weights_file(src)
    state_dict = loaded.get("state_dict", loaded)
    fmt = segformer_weights.detect_format(state_dict)
    if fmt is None:
        raise ValueError(f"{src}: not a SegFormer/BoostFormer checkpoint in a known format "
                         f"({', '.join(segformer_weights.FORMATS.values())})")
    converted, dropped = segformer_weights.convert(state_dict, fmt)
    with open(dst, "wb") as f:
        pickle.dump({"model": converted, "__author__": segformer_weights.FORMATS[fmt]}, f)
    return (f"{src}: {segformer_weights.FORMATS[fmt]}, {segformer_weights.describe(converted)}; wrote "
            f"{len(converted)} tensors to {dst}; dropped: {', '.join(sorted(dropped)) or 'none'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="HuggingFace directory/.safetensors/.bin, or NVlabs/MMSegmentation .pth")
    parser.add_argument("output", help="detectron2 weights (.pkl)")
    args = parser.parse_args(argv)
    print(convert(args.input, args.output))


if __name__ == "__main__":
    main()
