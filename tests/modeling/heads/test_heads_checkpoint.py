"""State-dict keys and shapes of the head equal the official checkpoints' (docs/checkpoints.md),
and a checkpoint in that format round-trips through detectron2's checkpointer with nothing
missing, unexpected or skipped."""
import copy
import functools
import glob
import os
import pickle

import pytest
import torch

from .heads_helpers import config_path, load_cfg  # noqa: I100  (registers the fake backbone first)

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

# (config, classes K, queries Q, shepard power learnable, res2..res5 channels)
MINI = (32, 128, 256, 384)
CONFIGS = {
    "ade_mini": ("ade20k/semantic-segmentation/aff/maskformer2_aff_mini_bs32_80k.yaml", 150, 100, True, MINI),
    "city_ins_mini": ("cityscapes/instance-segmentation/aff/maskformer2_aff_mini_bs32_45k.yaml", 8, 100, True, MINI),
    "city_pan_mini": ("cityscapes/panoptic-segmentation/aff/maskformer2_aff_mini_bs32_45k.yaml", 19, 100, True, MINI),
    "coco_mini": ("coco/instance-segmentation/aff/maskformer2_aff_mini_bs64_50ep.yaml", 80, 100, False, MINI),
}
CHANNELS = {"mini": MINI, "tiny": (64, 128, 256, 512), "small": (96, 192, 384, 768), "base": (128, 256, 512, 1024)}
# folder: (classes K, shepard power learnable)
DATASETS = {
    "ade20k/semantic-segmentation": (150, True),
    "cityscapes/instance-segmentation": (8, True),
    "cityscapes/panoptic-segmentation": (19, True),
    "coco/instance-segmentation": (80, False),
}


def every_aff_config():
    """Every shipped AFF config of the four tasks, with the head it must build."""
    found = {}
    for folder, (num_classes, learnable) in DATASETS.items():
        for path in sorted(glob.glob(config_path(f"{folder}/aff/maskformer2_aff_*.yaml"))):
            name = os.path.basename(path)
            size = name.split("_")[2]
            queries = 250 if size == "base" else 100
            found[f"{folder}/{name}"] = (f"{folder}/aff/{name}", num_classes, queries, learnable,
                                                      CHANNELS[size])
    return found


OTHER_SIZES = {k: v for k, v in every_aff_config().items() if v[0] not in {c[0] for c in CONFIGS.values()}}


def expected_head_shapes(num_classes, num_queries, learnable, channels):
    """The head's checkpoint keys and shapes, written out from the official checkpoints."""
    c0, c1, c2, c3 = channels
    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    keys = {}

    def linear(name, out_dim, in_dim):
        keys[name + ".weight"] = (out_dim, in_dim)
        keys[name + ".bias"] = (out_dim,)

    def norm(name, dim):
        keys[name + ".weight"] = (dim,)
        keys[name + ".bias"] = (dim,)

    for i, c in enumerate((c3, c2, c1)):  # input_proj.0 reads res5
        linear(f"{pd}input_proj.{i}.0", 256, c)
        norm(f"{pd}input_proj.{i}.1", 256)
    keys[pd + "transformer.level_embed"] = (3, 256)
    for i in range(6):
        layer = f"{pd}transformer.encoder.layers.{i}."
        if learnable:
            keys[layer + "self_attn.shepard_power"] = (1,)
        linear(layer + "self_attn.sampling_offsets", 192, 256)
        linear(layer + "self_attn.attention_weights", 96, 256)
        linear(layer + "self_attn.value_proj", 256, 256)
        linear(layer + "self_attn.output_proj", 256, 256)
        norm(layer + "norm1", 256)
        linear(layer + "linear1", 1024, 256)
        linear(layer + "linear2", 256, 1024)
        norm(layer + "norm2", 256)
    linear(pd + "mask_features", 256, 256)
    linear(pd + "adapter_1.0", 256, c0)
    norm(pd + "adapter_1.1", 256)
    linear(pd + "layer_1.0.weight_net.0", 4, 5)
    norm(pd + "layer_1.0.weight_net.1", 4)
    norm(pd + "layer_1.0.norm", 1024)
    linear(pd + "layer_1.0.linear", 256, 1024)
    norm(pd + "layer_1.1", 256)

    for i in range(9):
        for kind, attn in (("self", "self_attn"), ("cross", "multihead_attn")):
            layer = f"{pr}transformer_{kind}_attention_layers.{i}."
            keys[layer + attn + ".in_proj_weight"] = (768, 256)
            keys[layer + attn + ".in_proj_bias"] = (768,)
            linear(layer + attn + ".out_proj", 256, 256)
            norm(layer + "norm", 256)
        layer = f"{pr}transformer_ffn_layers.{i}."
        linear(layer + "linear1", 2048, 256)
        linear(layer + "linear2", 256, 2048)
        norm(layer + "norm", 256)
    norm(pr + "decoder_norm", 256)
    keys[pr + "query_feat.weight"] = (num_queries, 256)
    keys[pr + "query_embed.weight"] = (num_queries, 256)
    keys[pr + "level_embed.weight"] = (3, 256)
    linear(pr + "class_embed", num_classes + 1, 256)
    for i in range(3):
        linear(f"{pr}mask_embed.layers.{i}", 256, 256)
    keys["criterion.empty_weight"] = (num_classes + 1,)
    return keys


def head_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def round_trip(path, model):
    """Load ``path`` into a zeroed copy of ``model``; return it and the incompatible keys."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for v in fresh.state_dict().values():
            v.zero_()
    checkpointer = DetectionCheckpointer(fresh)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    return fresh, incompatible


def assert_loaded(fresh, model, incompatible):
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    reference = model.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, reference[k]), k


@functools.lru_cache(maxsize=1)
def built(relpath):
    cfg = load_cfg(relpath)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def check_config(tmp_path, relpath, num_classes, num_queries, learnable, channels):
    cfg, model = built(relpath)
    assert head_shapes(model) == expected_head_shapes(num_classes, num_queries, learnable, channels)
    shepard = model.sem_seg_head.pixel_decoder.transformer.encoder.layers[0].self_attn.shepard_power
    assert float(torch.as_tensor(shepard).detach()) == pytest.approx(cfg.MODEL.AFF.SHEPARD_POWER / 2)

    # the published checkpoints are detectron2 checkpoints: {"model": state_dict, ...}
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    fresh, incompatible = round_trip(str(tmp_path / "model_final.pth"), model)
    assert_loaded(fresh, model, incompatible)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_keys_and_round_trip(tmp_path, name):
    check_config(tmp_path, *CONFIGS[name])


def test_third_party_pickle_with_matching_heuristics(tmp_path):
    """The converter's format (tools/convert-pretrained-model-to-d2.py) loads with nothing skipped."""
    _, model = built(CONFIGS["coco_mini"][0])
    path = tmp_path / "converted.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model.state_dict(), "__author__": "third_party", "matching_heuristics": True}, f)
    fresh, incompatible = round_trip(str(path), model)
    assert_loaded(fresh, model, incompatible)


def test_every_size_is_checked():
    # ADE and COCO: Mini-1/5, Tiny(-1/5), Small(-1/5); Cityscapes instance and panoptic: Tiny, Small, Base
    assert len(OTHER_SIZES) == 16


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OTHER_SIZES))
def test_head_keys_other_sizes(tmp_path, name):
    check_config(tmp_path, *OTHER_SIZES[name])
