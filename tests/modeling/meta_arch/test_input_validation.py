"""MaskFormer's entry checks: every invalid input named in one message, accepted dtypes give the
float32 result, and configs whose counts cannot build a model are refused at build time."""
import numpy as np
import pytest
import torch

import aff_seg
from detectron2.modeling import build_model
from aff_seg.modeling.meta_arch import InvalidInputError, check_batched_inputs

from .test_input_fuzz import ADE_MINI, TINY_OPTS, tiny_model


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model()


def image(h=40, w=56, dtype=torch.float32):
    return (torch.arange(3 * h * w).reshape(3, h, w) % 251).to(dtype)


@pytest.mark.parametrize("inputs,message", [
    ([], "batched_inputs is empty"),
    ({"image": image()}, "must be a list of dicts"),
    ([image()], "input 0 must be a dict"),
    ([{"height": 4}], "input 0 has no 'image'"),
    ([{"image": image().numpy()}], "numpy array"),
    ([{"image": image(dtype=torch.bool)}], "dtype torch.bool"),
    ([{"image": image(dtype=torch.int64)}], "dtype torch.int64"),
    ([{"image": torch.complex(image(), image())}], "dtype torch.complex64"),
    ([{"image": image()[:1]}], "non-empty 3 x H x W tensor, got shape (1, 40, 56)"),
    ([{"image": image()[None]}], "got shape (1, 3, 40, 56)"),
    ([{"image": image(h=0)}], "got shape (3, 0, 56)"),
    ([{"image": image(), "height": 0}], "'height' must be a positive integer, got 0"),
    ([{"image": image(), "width": -3}], "'width' must be a positive integer, got -3"),
    ([{"image": image(), "height": 12.5}], "got 12.5"),
    ([{"image": image(), "height": None}], "got None"),
    ([{"image": image(), "height": True}], "got True"),
    ([{"image": image() * float("nan")}], "non-finite (NaN or inf)"),
    ([{"image": image() * 1e30}], "beyond the 1e+06 accepted"),
])
def test_invalid_inputs_are_named(model, inputs, message):
    with pytest.raises(InvalidInputError) as e:
        model(inputs)
    assert message in str(e.value)
    assert str(e.value).startswith("MaskFormer:")


def test_all_problems_of_a_batch_in_one_message():
    inputs = [{"image": image()}, {"image": image().numpy()}, {"height": 3}, {"image": image(), "width": 0}]
    with pytest.raises(ValueError) as e:  # InvalidInputError is a ValueError and a TypeError
        check_batched_inputs(inputs, 3, "Model")
    assert [line.strip().split(":")[0].split(" has")[0] for line in str(e.value).splitlines()[1:]] == [
        "input 1", "input 2", "input 3"]


def test_accepted_dtypes_and_sizes_give_the_float32_result(model):
    with torch.no_grad():
        expected = model([{"image": image()}])[0]["sem_seg"]
        for dtype in (torch.uint8, torch.float64):
            assert torch.equal(model([{"image": image(dtype=dtype)}])[0]["sem_seg"], expected)
        half = model([{"image": image(dtype=torch.float16)}])[0]["sem_seg"]
        assert torch.isfinite(half).all()
        sized = model([{"image": image(), "height": np.int64(20), "width": torch.tensor(28)}])[0]["sem_seg"]
    assert sized.shape[-2:] == (20, 28)


@pytest.mark.parametrize("key,value,message", [
    ("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "0", "NUM_OBJECT_QUERIES=0 must be a positive integer"),
    ("MODEL.MASK_FORMER.DEC_LAYERS", "0", "DEC_LAYERS=0"),
    ("MODEL.MASK_FORMER.NHEADS", "3", "HIDDEN_DIM=32 is not divisible by NHEADS=3"),
    ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1", "NUM_CLASSES=-1"),
    ("MODEL.PIXEL_STD", "[58.0, 0.0, 57.0]", "PIXEL_STD=[58.0, 0.0, 57.0] must be finite and positive"),
    ("MODEL.PIXEL_MEAN", "[1.0, 2.0]", "PIXEL_MEAN has 2 values but MODEL.PIXEL_STD has 3"),
    ("MODEL.AFF.ALPHA", "-4.0", "MODEL.AFF.ALPHA"),
])
def test_config_counts_are_checked_at_build_time(key, value, message):
    cfg = aff_seg.load_config(ADE_MINI, TINY_OPTS + [key, value])
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    assert message in str(e.value)
