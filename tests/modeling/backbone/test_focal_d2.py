"""Focal Transformer in detectron2: the config keys, the registered backbone, official
classification checkpoints through MODEL.WEIGHTS and the converter."""
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import aff_seg  # noqa: F401  (compat fixes before detectron2)
from aff_seg import add_maskformer2_config
from detectron2.config import get_cfg
from detectron2.modeling import ShapeSpec, build_backbone
from aff_seg.checkpoint import AFFCheckpointer, CheckpointMismatchError
from aff_seg.modeling.backbone import FocalTransformer

ROOT = Path(__file__).resolve().parents[3]
TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def focal_cfg(**focal):
    cfg = add_maskformer2_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "D2FocalTransformer"
    for key, value in {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "NUM_HEADS": [1, 2, 2, 4], **focal}.items():
        cfg.MODEL.FOCAL[key] = value
    return cfg


def test_defaults_are_the_published_focal_tiny():
    focal = add_maskformer2_config(get_cfg()).MODEL.FOCAL
    assert (focal.EMBED_DIM, focal.DEPTHS, focal.NUM_HEADS, focal.FOCAL_POOL, focal.FOCAL_LEVELS) == (
        96, [2, 2, 6, 2], [3, 6, 12, 24], "fc", [2, 2, 2, 2])
    cfg = add_maskformer2_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "D2FocalTransformer"
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    assert sum(p.numel() for p in backbone.parameters()) == 28_112_724  # the backbone-only Focal-T


def test_registered_backbone_gives_dense_maps():
    backbone = build_backbone(focal_cfg(OUT_FEATURES=["res3", "res5"])).eval()
    assert backbone.output_format == "maps" and backbone.size_divisibility == 32
    assert backbone.output_shape() == {"res3": ShapeSpec(channels=32, stride=8), "res5": ShapeSpec(channels=128, stride=32)}
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"res3": (1, 32, 8, 12), "res5": (1, 128, 2, 3)}


@pytest.mark.parametrize("key,value", [
    ("USE_SHIFT", True), ("FOCAL_LEVELS", [3, 2, 2, 2]), ("APE", True), ("EXPAND_STAGES", [0, 1]),
    ("OUT_FEATURES", ["res6"]),
])
def test_unsupported_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"MODEL.FOCAL.{key}"):
        build_backbone(focal_cfg(**{key: value}))


class Segmenter(nn.Module):
    """A stand-in meta-architecture: the Focal backbone plus a head with a ``norm``."""

    def __init__(self, **kwargs):
        super().__init__()
        self.backbone = build_backbone(focal_cfg(**kwargs))
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.norm = nn.LayerNorm(128)


def classification_state_dict(seed=0, **kwargs):
    """Shaped like an official checkpoint: un-prefixed backbone keys plus the final norm and head."""
    torch.manual_seed(seed)
    state = dict(FocalTransformer(**{**TINY, **kwargs}, out_indices=()).state_dict())
    for p in state.values():
        if p.is_floating_point():
            p.normal_()
    c = state["layers.3.blocks.0.norm1.weight"].shape[0]
    state.update({"norm.weight": torch.randn(c), "norm.bias": torch.randn(c),
                  "head.weight": torch.randn(1000, c), "head.bias": torch.randn(1000)})
    return state


@pytest.mark.parametrize("wrapped", [False, True])
def test_classification_checkpoint_loads_through_model_weights(tmp_path, caplog, wrapped):
    state = classification_state_dict()
    torch.save({"model": state, "epoch": 299} if wrapped else state, tmp_path / "focal.pth")
    model = Segmenter()
    head_norm = model.sem_seg_head.norm.weight.clone()
    with caplog.at_level(logging.INFO):
        AFFCheckpointer(model).load(str(tmp_path / "focal.pth"))
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith(("head.", "norm.")):
            assert torch.equal(loaded["backbone." + key], value), key
    assert torch.equal(model.sem_seg_head.norm.weight, head_norm)
    report = [r.getMessage() for r in caplog.records if "Focal Transformer classification checkpoint" in r.getMessage()]
    new = ", ".join(f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight"))
    assert len(report) == 1 and report[0].endswith(f"new (not in the file): {new}")
    assert "head.bias, head.weight, norm.bias, norm.weight" in report[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "does not fit" in r.getMessage()]


def test_checkpoint_of_another_size_names_the_mismatches(tmp_path, caplog):
    torch.save(classification_state_dict(embed_dim=32, num_heads=(2, 2, 4, 4)), tmp_path / "other.pth")
    model = Segmenter()
    before = model.backbone.layers[0].blocks[0].attn.qkv.weight.clone()
    with pytest.raises(CheckpointMismatchError, match=r"qkv.weight +\| shape differs \(not loaded\) +\| \(96, 32\)"):
        AFFCheckpointer(model).load(str(tmp_path / "other.pth"))  # strict by default
    with caplog.at_level(logging.INFO):
        AFFCheckpointer(model, strict=False).load(str(tmp_path / "other.pth"))
    warning = " ".join(r.getMessage() for r in caplog.records if "does not fit" in r.getMessage())
    assert "layers.0.blocks.0.attn.qkv.weight (96, 32) in the file, (48, 16) in the model" in warning
    assert "layers.0.blocks.0.attn.relative_position_bias_table (169, 2) in the file, (169, 1) in the model" in warning
    assert torch.equal(model.backbone.layers[0].blocks[0].attn.qkv.weight, before)  # skipped, not half-loaded


def test_converter_writes_prefixed_weights_without_heuristics(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_focal", ROOT / "tools" / "convert-focal-to-d2.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    state = classification_state_dict(seed=1)
    torch.save({"model": state}, tmp_path / "focal.pth")
    convert.main([str(tmp_path / "focal.pth"), str(tmp_path / "focal.pkl")])
    assert "norm0..3" in capsys.readouterr().out
    model = Segmenter()
    AFFCheckpointer(model).load(str(tmp_path / "focal.pkl"))
    assert torch.equal(model.backbone.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.equal(model.backbone.layers[2].blocks[0].pool_layers[0].weight, state["layers.2.blocks.0.pool_layers.0.weight"])
    torch.save({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a Focal Transformer classification checkpoint"):
        convert.convert(str(tmp_path / "other.pth"), str(tmp_path / "other.pkl"))


def test_tokens_variant_has_the_same_weights_and_gives_grid_tokens():
    cfg = focal_cfg()
    maps = build_backbone(cfg).eval()
    cfg.MODEL.BACKBONE.NAME = "D2FocalTransformerTokens"
    tokens = build_backbone(cfg).eval()
    assert tokens.output_format == "tokens" and tokens.output_shape() == maps.output_shape()
    tokens.load_state_dict(maps.state_dict())  # same keys: one checkpoint for both
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        dense, out = maps(x), tokens(x)
    for name, feature in dense.items():
        assert torch.equal(out[name], feature.flatten(2).transpose(1, 2)), name
        assert out[f"{name}_spatial_shape"] == (16, 24)
    assert out["res5_pos"][0, :3].tolist() == [[3.5, 3.5], [11.5, 3.5], [19.5, 3.5]]  # stride-32 cell centres
