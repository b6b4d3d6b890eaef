"""Export of the dense-map models: grid Mask2Former, FASeg on a grid backbone and SegFormer
(CheckedSemanticSegmentor). The exported graph (torch.export program, ONNX file run by ONNX
Runtime) reproduces the eager model at input sizes other than the example's, the runtime's
post-processing gives the eager results, and the demo draws with an exported model."""
import os

import cv2
import numpy as np
import pytest
import torch

from aff_seg.config import load_config
from aff_seg.export import runtime
from aff_seg.export.exporter import check_exportable
from detectron2.modeling import build_model

from ..tools.conftest import ROOT, import_script

EXAMPLE = (128, 128)
# multiples of 32 that differ from the example; at 256 x 320 FASeg's high-resolution layer
# attends to 2 cells of stride 32, at the example's size to 1
SIZES = [(96, 160), (192, 128), (256, 320)]
_MASK2FORMER = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "2", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5",
]
# small random models: config file, overrides
MODELS = {
    "grid": ("configs/synthetic/ade20k_semantic_grid.yaml", _MASK2FORMER),
    "faseg_grid": ("configs/synthetic/ade20k_semantic_faseg_grid.yaml", _MASK2FORMER),
    "segformer": ("configs/synthetic/ade20k_semantic_segformer_b0.yaml", [
        "MODEL.MIT.EMBED_DIMS", "[8, 16, 24, 32]", "MODEL.MIT.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.MIT.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16"]),
}
# each export takes 20-40 s of CPU
CASES = [("segformer", "torch_export"), ("segformer", "onnx")]


def make_cfg(name, *extra):
    config, opts = MODELS[name]
    cfg = load_config(os.path.join(ROOT, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts, *extra])
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def exported(request, tmp_path_factory):
    """(case name, format, eager model, export directory): a random model saved as a checkpoint
    and exported from it by tools/export_model.py."""
    name, fmt = request.param
    torch.manual_seed(0)
    model = build_model(make_cfg(name)).eval()
    directory = tmp_path_factory.mktemp(f"{name}_{fmt}")
    weights = str(directory / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    config, opts = MODELS[name]
    import_script("tools", "export_model").main([
        "--config-file", os.path.join(ROOT, config), "--format", fmt, "--output", str(directory / "export"),
        "--example-size", *map(str, EXAMPLE), *opts, "MODEL.WEIGHTS", weights])
    return name, fmt, model, str(directory / "export")


def eager_raw(model, x):
    """The eager model's outputs that the exported graph returns."""
    with torch.no_grad():
        features = model.backbone(x)
        if hasattr(model.sem_seg_head, "predictor"):  # MaskFormer
            out = model.sem_seg_head(features)
            return {k: out[k] for k in runtime.MASK_OUTPUTS}
        return {"sem_seg_logits": model.sem_seg_head.layers(features)}


@pytest.mark.slow
def test_exported_graph_matches_eager_at_other_sizes(exported):
    _, _, model, directory = exported
    deployed = runtime.ExportedModel(directory)
    g = torch.Generator().manual_seed(0)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w, generator=g)
        expected, got = eager_raw(model, x), deployed.raw(x)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert got[key].shape == expected[key].shape, (key, h, w)
            assert (got[key] - expected[key]).abs().max() <= 1e-4, (key, h, w)
        image = torch.randint(0, 256, (3, h - 7, w - 5), generator=g).float()
        ours = deployed([{"image": image, "height": h + 9, "width": w - 20}])[0]["sem_seg"]
        with torch.no_grad():
            eager = model([{"image": image, "height": h + 9, "width": w - 20}])[0]["sem_seg"]
        assert ours.shape == eager.shape
        assert (ours.argmax(0) == eager.argmax(0)).float().mean() >= 0.999


@pytest.mark.slow
def test_panoptic_and_instance_results_from_the_exported_outputs(exported, monkeypatch):
    """The same raw outputs give the panoptic and instance results of the eager model."""
    _, _, model, directory = exported
    if not hasattr(model, "postprocess_settings"):
        pytest.skip("semantic-only model")
    monkeypatch.setattr(model, "panoptic_on", True)
    monkeypatch.setattr(model, "instance_on", True)
    monkeypatch.setattr(model, "sem_seg_postprocess_before_inference", True)
    monkeypatch.setattr(model, "object_mask_threshold", 0.0)  # keep every query of the random model
    deployed = runtime.ExportedModel(directory)
    deployed.settings["postprocess"] = model.postprocess_settings()
    image = torch.randint(0, 256, (3, 150, 210), generator=torch.Generator().manual_seed(1)).float()
    ours = deployed([{"image": image}])[0]
    with torch.no_grad():
        eager = model([{"image": image}])[0]
    (ids, segments), (eager_ids, eager_segments) = ours["panoptic_seg"], eager["panoptic_seg"]
    assert segments and segments == eager_segments
    assert (ids == eager_ids).float().mean() >= 0.999
    inst, eager_inst = ours["instances"], eager["instances"]
    assert len(inst) == len(eager_inst) > 0
    assert torch.equal(inst.pred_classes, eager_inst.pred_classes)
    torch.testing.assert_close(inst.scores, eager_inst.scores, atol=1e-4, rtol=0)
    assert (inst.pred_masks == eager_inst.pred_masks).float().mean() >= 0.999


@pytest.mark.slow
def test_bad_input_gets_a_clear_error(exported):
    _, _, _, directory = exported
    deployed = runtime.ExportedModel(directory)
    assert deployed.input["min_size"] == 64  # two cells of 32 a side
    with pytest.raises(ValueError, match="outside the exported range"):
        deployed.raw(torch.zeros(1, 3, 32, 128))
    with pytest.raises(ValueError, match="not a multiple of the size divisibility"):
        deployed.raw(torch.zeros(1, 3, 128, 112))
    with pytest.raises(ValueError, match="1 x 3 x H x W"):
        deployed.raw(torch.zeros(1, 1, 128, 128))


def test_semantic_heads_without_stride4_logits_are_refused_by_name():
    with pytest.raises(ValueError, match=r"MODEL.SEM_SEG_HEAD.NAME='SemSegFPNHead' cannot be exported"):
        check_exportable(make_cfg("segformer", "MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead"))


@pytest.mark.slow
def test_demo_draws_with_an_exported_model(exported, tmp_path):
    name, fmt, _, directory = exported
    if (name, fmt) != ("segformer", "onnx"):
        pytest.skip("drawn once, with the ONNX SegFormer")
    demo = import_script("demo", "demo")
    image = np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    out = tmp_path / "out"
    config = os.path.join(ROOT, MODELS["segformer"][0])
    rc = demo.main(["--config-file", config, "--exported", directory, "--input", str(tmp_path / "a.png"),
                    "--output", str(out), "--opts", "MODEL.DEVICE", "cpu"])
    assert rc == 0
    drawn = cv2.imread(str(out / "a.png"))
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)
