"""SegFormer / BoostFormer (CheckedSemanticSegmentor) check their inputs like MaskFormer."""
import numpy as np
import pytest
import torch

from aff_seg.modeling.meta_arch import InvalidInputError  # (aff_seg before detectron2)
from detectron2.modeling import build_model

from ..backbone.segformer_helpers import TINY_MIT, semantic_cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(semantic_cfg("mit", num_classes=5, embed_dim=16, encoder=TINY_MIT)).eval()


@pytest.mark.parametrize("inputs, message", [
    ([], "empty"),
    ([{"file_name": "a.jpg"}], "no 'image'"),
    ([{"image": np.zeros((3, 64, 64), np.uint8)}], "image"),
    ([{"image": torch.zeros(1, 64, 64)}], "3"),
    ([{"image": torch.full((3, 64, 64), float("nan"))}], "finite"),
    ([{"image": torch.zeros(3, 64, 64), "height": 0}], "height"),
])
def test_invalid_inputs_are_named(model, inputs, message):
    with pytest.raises(InvalidInputError, match=message) as error:
        model(inputs)
    assert str(error.value).startswith("CheckedSemanticSegmentor")


def test_valid_input_gives_the_semantic_scores(model):
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "height": 32, "width": 48}])
    assert out[0]["sem_seg"].shape == (5, 32, 48)
