"""Official classification checkpoints through MODEL.WEIGHTS, code-free loading, and the converter."""
import importlib.util
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import aff_seg  # noqa: F401
from aff_seg.modeling.backbone import AFF, AFF_SIZES
from aff_seg.checkpoint import AFFCheckpointer, load_weights_file
from detectron2.checkpoint import DetectionCheckpointer

ROOT = Path(__file__).resolve().parents[3]


class Segmenter(nn.Module):
    """A stand-in for the meta-architecture: a backbone plus a head whose norm has the
    classification ``norm.*`` shape (where detectron2's suffix heuristic misplaces it)."""

    def __init__(self):
        super().__init__()
        self.backbone = AFF(**AFF_SIZES["mini"])
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.norm = nn.LayerNorm(384)


def classification_checkpoint(path, seed=0):
    """A file shaped like the official ImageNet ones: un-prefixed keys + norm/head + RNG states."""
    torch.manual_seed(seed)
    model = AFF(**AFF_SIZES["mini"], out_indices=())
    state = dict(model.state_dict())
    state.update({"norm.weight": torch.randn(384), "norm.bias": torch.randn(384),
                  "head.weight": torch.randn(1000, 384), "head.bias": torch.randn(1000)})
    torch.save({"model": state, "epoch": 299, "max_accuracy": 78.2, "rng": torch.get_rng_state(),
                "random": random.getstate(), "np_rng": np.random.get_state()}, path)
    return state


def test_classification_pth_loads_through_model_weights(tmp_path, caplog):
    state = classification_checkpoint(tmp_path / "aff_mini.pth")
    model = Segmenter()
    head_before = model.sem_seg_head.norm.weight.clone()
    with caplog.at_level(logging.INFO):
        AFFCheckpointer(model).load(str(tmp_path / "aff_mini.pth"))
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith(("head.", "norm.")):
            assert torch.equal(loaded["backbone." + key], value), key
    assert torch.equal(model.sem_seg_head.norm.weight, head_before)  # classifier norm not misplaced
    log = caplog.text
    assert "classification checkpoint" in log and "head.bias, head.weight, norm.bias, norm.weight" in log
    assert "backbone.norm0" in log  # detectron2's report of what the checkpoint did not provide


def test_loading_never_runs_code_from_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ("evil.pth", "evil.pkl"):
        with open(tmp_path / name, "wb") as f:
            if name.endswith(".pth"):
                torch.save({"model": {"x": Evil()}}, f)
            else:
                pickle.dump({"model": {"x": Evil()}, "__author__": "x"}, f)
        with pytest.raises(pickle.UnpicklingError):
            load_weights_file(str(tmp_path / name))


def test_converter_matches_the_original_tool_and_its_output_loads(tmp_path):
    state = classification_checkpoint(tmp_path / "aff_mini.pth")
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert-pretrained-model-to-d2.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(tmp_path / "aff_mini.pth"), str(tmp_path / "aff_mini.pkl")])
    with open(tmp_path / "aff_mini.pkl", "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["__author__"] == "third_party" and data["matching_heuristics"] is True
    assert data["model"].keys() == state.keys() and all(torch.equal(data["model"][k], state[k]) for k in state)
    assert isinstance(load_weights_file(str(tmp_path / "aff_mini.pkl"))["model"]["head.weight"], torch.Tensor)
    for checkpointer in (AFFCheckpointer, DetectionCheckpointer):  # ours, and detectron2's heuristics
        model = Segmenter()
        checkpointer(model).load(str(tmp_path / "aff_mini.pkl"))
        assert torch.equal(model.backbone.layers[2].blocks[5].attn.kv.weight, state["layers.2.blocks.5.attn.kv.weight"])
        assert torch.equal(model.backbone.patch_embed.bn.running_var, state["patch_embed.bn.running_var"])
        # the suffix heuristic puts the classifier's norm.* into any *.norm of the same shape (the
        # original's AFF-Base quirk); AFFCheckpointer drops it
        misplaced = torch.equal(model.sem_seg_head.norm.weight, state["norm.weight"])
        assert misplaced == (checkpointer is DetectionCheckpointer)


def test_detectron2_checkpoint_round_trip(tmp_path):
    model = Segmenter()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final", iteration=7)
    other = Segmenter()
    AFFCheckpointer(other).load(str(tmp_path / "model_final.pth"))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
