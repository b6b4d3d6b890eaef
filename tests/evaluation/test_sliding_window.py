"""Sliding-window inference: window placement, score averaging, real semantic models, bad settings."""
import pytest
import torch
from torch import nn

import aff_seg  # noqa: F401
from aff_seg import add_maskformer2_config
from aff_seg.evaluation import SlidingWindowInference
from aff_seg.evaluation.sliding_window import window_starts
from detectron2.config import get_cfg
from detectron2.modeling import build_model


class Recorder(nn.Module):
    """Returns ``value(call index, crop)`` as the scores of each window and remembers the crops."""

    def __init__(self, value):
        super().__init__()
        self.value, self.crops = value, []

    def forward(self, batched_inputs):
        (inputs,) = batched_inputs
        assert inputs["image"].shape[-2:] == (inputs["height"], inputs["width"])
        self.crops.append(inputs["image"])
        return [{"sem_seg": self.value(len(self.crops) - 1, inputs["image"])}]


def test_window_starts_cover_the_image_and_end_at_its_border():
    assert window_starts(2048, 1024, 768) == [0, 768, 1024]  # Cityscapes width, SegFormer's windows
    assert window_starts(1024, 1024, 768) == [0]
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(10, 4, 20) == [0, 6]


def test_overlapping_scores_are_averaged():
    model = SlidingWindowInference(Recorder(lambda i, crop: torch.full((1,) + crop.shape[-2:], float(i))), (2, 4), (2, 2))
    out = model([{"image": torch.zeros(3, 2, 6)}])[0]["sem_seg"]
    # windows at columns 0-3 (score 0) and 2-5 (score 1)
    assert out[0, 0].tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]


def test_scores_follow_the_image_and_are_resized_to_the_output_size():
    image = torch.arange(3 * 8 * 12, dtype=torch.float32).reshape(3, 8, 12)
    recorder = Recorder(lambda i, crop: crop[:2] * 2)
    out = SlidingWindowInference(recorder, (5, 5), (3, 4))([{"image": image}])[0]["sem_seg"]
    assert torch.allclose(out, image[:2] * 2)
    assert len(recorder.crops) == 2 * 3
    resized = SlidingWindowInference(recorder, (5, 5), (3, 4))([{"image": image, "height": 4, "width": 6}])
    assert resized[0]["sem_seg"].shape == (2, 4, 6)


def test_bad_windows_are_clear_errors():
    recorder = Recorder(lambda i, crop: crop[:1])
    with pytest.raises(ValueError, match="TEST.SLIDING_WINDOW.STRIDE"):
        SlidingWindowInference(recorder, (4, 4), (0, 4))
    with pytest.raises(ValueError, match="TEST.SLIDING_WINDOW.SIZE"):
        SlidingWindowInference(recorder, (0, 4), (2, 2))
    with pytest.raises(ValueError, match=r"TEST.SLIDING_WINDOW.SIZE \[16, 16\] is larger than the 8x20 test image"):
        SlidingWindowInference(recorder, (16, 16), (8, 8))([{"image": torch.zeros(3, 8, 20)}])


def test_segformer_with_one_window_equals_whole_image_inference():
    cfg = add_maskformer2_config(get_cfg())
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "CheckedSemanticSegmentor", "MODEL.DEVICE", "cpu",
                         "MODEL.BACKBONE.NAME", "D2MixVisionTransformer", "MODEL.MIT.EMBED_DIMS", "[8, 16, 24, 32]",
                         "MODEL.MIT.DEPTHS", "[1, 1, 1, 1]", "MODEL.MIT.NUM_HEADS", "[1, 2, 2, 4]",
                         "MODEL.SEM_SEG_HEAD.NAME", "SegFormerHead", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3",
                         "MODEL.SEM_SEG_HEAD.CONVS_DIM", "8", "MODEL.SEM_SEG_HEAD.NORM", "BN",
                         "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.rand(3, 64, 96) * 255, "height": 32, "width": 48}]
    with torch.no_grad():
        whole = model(inputs)[0]["sem_seg"]
        one = SlidingWindowInference(model, (64, 96), (64, 96))(inputs)[0]["sem_seg"]
        several = SlidingWindowInference(model, (64, 64), (32, 32))(inputs)[0]["sem_seg"]
    assert torch.allclose(whole, one, atol=1e-5)
    assert several.shape == (3, 32, 48) and not torch.allclose(whole, several, atol=1e-3)
