"""tools/analyze_model.py on SegFormer-B2 and BoostFormer at 512x512: the count without matrix products (thop's
convention, conv and linear layers and the norms) is within 5% of the published thop figures, and the full
fvcore count (attention products included) is reported beside it."""
import os

import pytest

from .conftest import ROOT  # noqa: I100

# the READMEs' thop counts at 1x3x512x512, 150 classes (multiply-adds)
PUBLISHED_GMACS = {
    "ade20k/semantic-segmentation/segformer/segformer_b2_512x512_160k.yaml": 58.576,
    "ade20k/semantic-segmentation/boostformer/boostformer_512x512_160k.yaml": 15.826,
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(PUBLISHED_GMACS))
def test_flops_at_512_match_the_published_counts(analyze_model, config, tmp_path):
    results = analyze_model.main([
        "--config-file", os.path.join(ROOT, "configs", config), "--tasks", "flop", "parameter",
        "--use-fixed-input-size", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
    ])
    published = PUBLISHED_GMACS[config]
    assert results["gflops_without_matmul"] == pytest.approx(published, rel=0.05)
    attention = sum(results["gflops_by_operator"].get(op, 0.0) for op in ("matmul", "bmm", "einsum"))
    assert attention > 0
    assert results["gflops"] == pytest.approx(results["gflops_without_matmul"] + attention)
    assert results["parameters"] == (27_461_974 if "segformer" in config else 17_576_602)
