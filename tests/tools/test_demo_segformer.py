"""The demo runs SegFormer / BoostFormer (semantic models of detectron2's SemanticSegmentor), whole-image and
with sliding windows."""
import os

import cv2
import numpy as np
import pytest

from .conftest import ROOT

TINY = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.MIT.EMBED_DIMS", "[8, 16, 24, 32]",
        "MODEL.MIT.DEPTHS", "[1, 1, 1, 1]", "MODEL.MIT.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.BOOSTFORMER.EMBED_DIMS",
        "[8, 16, 24, 32]", "MODEL.BOOSTFORMER.DEPTHS", "[1, 1, 1, 1]", "MODEL.BOOSTFORMER.NUM_HEADS", "[1, 2, 2, 4]",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]


@pytest.mark.parametrize("config, sliding", [
    ("configs/synthetic/ade20k_semantic_segformer_b0.yaml", False),
    ("configs/synthetic/ade20k_semantic_boostformer.yaml", False),
    ("configs/synthetic/cityscapes_semantic_segformer_b0.yaml", True),  # 64x64 windows every 48 px
])
def test_demo_draws_semantic_segformer_models(demo, config, sliding, tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    out = tmp_path / "out"
    rc = demo.main(["--config-file", os.path.join(ROOT, config), "--input", str(tmp_path / "a.png"),
                    "--output", str(out), "--opts", *TINY])
    assert rc == 0
    drawn = cv2.imread(str(out / "a.png"))
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)
