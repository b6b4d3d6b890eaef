"""Export of the dense-map models: grid Mask2Former, FASeg on a grid backbone, SegFormer and
BoostFormer (CheckedSemanticSegmentor). The exported graph (torch.export program, ONNX file run by
ONNX Runtime) reproduces the eager model at input sizes other than the example's, the runtime's
post-processing gives the eager results, bad input gets a clear error, and the demo draws with an
exported model."""
import copy
import os

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from aff_seg.config import load_config
from aff_seg.export import runtime
from aff_seg.export.exporter import check_exportable, export_program, onnx_translations, save
from detectron2.data import Metadata
from detectron2.modeling import build_model

from ..tools.conftest import ROOT, import_script
from .helpers import assert_same_panoptic_and_instances

EXAMPLE = (128, 128)
# multiples of 32 that differ from the example; at 256 x 320 FASeg's high-resolution layer
# attends to 2 cells of stride 32, at the example's size to 1, and BoostFormer's 7 x 7 key/value
# pool averages windows of other lengths
SIZES = [(96, 160), (192, 128), (256, 320)]
_MASK2FORMER = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "2", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5",
]
# small random models: config file, overrides
MODELS = {
    # one decoder layer (plus the learnable queries' loss layer)
    "grid": ("configs/synthetic/ade20k_semantic_grid.yaml", _MASK2FORMER + ["MODEL.MASK_FORMER.DEC_LAYERS", "2"]),
    # res5, res4, res3 and the high-resolution layer
    "faseg_grid": ("configs/synthetic/ade20k_semantic_faseg_grid.yaml", _MASK2FORMER),
    "segformer": ("configs/synthetic/ade20k_semantic_segformer_b0.yaml", [
        "MODEL.MIT.EMBED_DIMS", "[8, 16, 24, 32]", "MODEL.MIT.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.MIT.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16"]),
    "boostformer": ("configs/synthetic/ade20k_semantic_boostformer.yaml", [
        "MODEL.BOOSTFORMER.EMBED_DIMS", "[8, 16, 24, 32]", "MODEL.BOOSTFORMER.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.BOOSTFORMER.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16"]),
}
# exported through tools/export_model.py from a checkpoint, once per format; the other models
# share one torch.export (export_program) between their formats. An export takes 10-25 s of
# CPU, an ONNX conversion 10-20 s.
CLI_MODELS = ("segformer",)
CASES = [("segformer", "torch_export"), ("segformer", "onnx"), ("grid", "torch_export"), ("grid", "onnx"),
         ("faseg_grid", "torch_export"), ("faseg_grid", "onnx"), ("boostformer", "torch_export"),
         ("boostformer", "onnx")]


def make_cfg(name, *extra):
    config, opts = MODELS[name]
    cfg = load_config(os.path.join(ROOT, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts, *extra])
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def programs():
    """model name -> (eager model, program, settings): one torch.export per model."""
    return {}


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def exported(request, programs, tmp_path_factory):
    """(case name, format, eager model, export directory, the export loaded by the runtime): a
    random model exported by tools/export_model.py from a checkpoint (CLI_MODELS) or saved from
    the model's program."""
    name, fmt = request.param
    directory = tmp_path_factory.mktemp(f"{name}_{fmt}")
    config, opts = MODELS[name]
    if name in CLI_MODELS:
        torch.manual_seed(0)
        model = build_model(make_cfg(name)).eval()
        weights = str(directory / "model.pth")
        torch.save({"model": model.state_dict()}, weights)
        import_script("tools", "export_model").main([
            "--config-file", os.path.join(ROOT, config), "--format", fmt, "--output", str(directory / "export"),
            "--example-size", *map(str, EXAMPLE), *opts, "MODEL.WEIGHTS", weights])
        return name, fmt, model, str(directory / "export"), runtime.ExportedModel(str(directory / "export"))
    if name not in programs:
        programs.clear()  # the previous model's program is not used again (CASES are grouped by model)
        torch.manual_seed(0)
        cfg = make_cfg(name)
        model = build_model(cfg).eval()
        programs[name] = (model, *export_program(model, cfg, EXAMPLE, config_file=config))
    model, program, settings = programs[name]
    save(program, settings, str(directory / "export"), fmt)
    return name, fmt, model, str(directory / "export"), runtime.ExportedModel(str(directory / "export"))


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
    _, _, model, _, deployed = exported
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
    name, _, model, _, deployed = exported
    if name != "grid":
        pytest.skip("checked with the grid Mask2Former")
    things = {i: i for i in range(0, model.sem_seg_head.num_classes, 2)}  # every other class
    monkeypatch.setattr(model, "metadata", Metadata(thing_dataset_id_to_contiguous_id=things))
    monkeypatch.setattr(model, "panoptic_on", True)
    monkeypatch.setattr(model, "instance_on", True)
    monkeypatch.setattr(model, "sem_seg_postprocess_before_inference", True)
    monkeypatch.setattr(model, "object_mask_threshold", 0.0)  # keep every query of the random model
    deployed = copy.copy(deployed)
    deployed.settings = {**deployed.settings, "postprocess": model.postprocess_settings()}
    image = torch.randint(0, 256, (3, 150, 210), generator=torch.Generator().manual_seed(1)).float()
    ours = deployed([{"image": image}])[0]
    with torch.no_grad():
        eager = model([{"image": image}])[0]
    assert_same_panoptic_and_instances(ours, eager)


@pytest.mark.slow
def test_bad_input_gets_a_clear_error(exported):
    """Checked by the runtime before the graph runs (both formats): each error names the expected
    and the received value."""
    deployed = exported[-1]
    assert deployed.input["min_size"] == 64  # two cells of 32 a side
    assert deployed.input["channels"] == 3 and deployed.input["dtype"] == "float32"
    bad = {
        r"outside the exported range: each side must be in \[64, 2048\] pixels, got a side of 32": (1, 3, 32, 128),
        r"outside the exported range: each side must be in \[64, 2048\] pixels, got a side of 2080": (1, 3, 128, 2080),
        r"128 x 112 is not a multiple of the size divisibility 32": (1, 3, 128, 112),
        r"takes a 1 x 3 x H x W image \(RGB\), got 1 channels": (1, 1, 128, 128),
        r"takes a 4-d 1 x 3 x H x W image, got 3-d shape \(3, 128, 128\)": (3, 128, 128),
        r"one image per call \(1 x 3 x H x W\), got a batch of 2": (2, 3, 128, 128),
    }
    for message, shape in bad.items():
        with pytest.raises(ValueError, match=message):
            deployed.raw(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"takes a float32 image \(normalised\), got torch.uint8"):
        deployed.raw(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 x 3 x H x W torch.Tensor, got ndarray"):
        deployed.raw(np.zeros((1, 3, 128, 128), np.float32))


class Branches(nn.Module):
    """A size-dependent branch: torch.export keeps the example's as a guard of the program."""

    def forward(self, image):
        return (image[:, :1] * 2 if image.shape[2] > 96 else image[:, :1],)


def test_a_guard_of_the_program_is_a_clear_error(tmp_path):
    """A size within [min_size, max_size] that the torch.export program's own guard refuses."""
    dims = [32 * torch.export.Dim(name, min=2, max=64) for name in ("rows", "cols")]
    program = torch.export.export(Branches(), (torch.zeros(1, 3, 128, 128),),
                                  dynamic_shapes={"image": {2: dims[0], 3: dims[1]}})
    settings = {"input": {"format": "RGB", "channels": 3, "dtype": "float32", "pixel_mean": [0.0] * 3,
                          "pixel_std": [1.0] * 3, "size_divisibility": 32, "min_size": 64, "max_size": 2048,
                          "example_size": [128, 128]},
                "outputs": ["sem_seg_logits"], "postprocess": {"common_stride": 1}}
    save(program, settings, str(tmp_path), "torch_export")
    deployed = runtime.ExportedModel(str(tmp_path))
    assert torch.equal(deployed.raw(torch.ones(1, 3, 160, 64))["sem_seg_logits"], torch.full((1, 1, 160, 64), 2.0))
    with pytest.raises(ValueError, match=r"input size 64 x 64 is outside the exported range: the program exported "
                                         r"at 128x128 does not accept it \(Guard failed"):
        deployed.raw(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("opts, message", [
    (["TEST.AUG.ENABLED", "True"], r"test-time augmentation \(TEST.AUG.ENABLED=True\) cannot be exported"),
    (["TEST.SLIDING_WINDOW.ENABLED", "True"],
     r"sliding-window inference \(TEST.SLIDING_WINDOW.ENABLED=True\) cannot be exported"),
    (["MODEL.META_ARCHITECTURE", "SemanticSegmentor"], r"MODEL.META_ARCHITECTURE='SemanticSegmentor' cannot be exported"),
    (["MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead"], r"MODEL.SEM_SEG_HEAD.NAME='SemSegFPNHead' cannot be exported"),
], ids=["tta", "sliding_window", "meta_architecture", "semantic_head"])
def test_unsupported_combinations_are_refused_by_name(opts, message):
    with pytest.raises(ValueError, match=message):
        check_exportable(make_cfg("segformer", *opts))


def test_adaptive_average_pool_in_onnx_at_any_size(tmp_path):
    """The ONNX translation of adaptive average pooling (BoostFormer's key/value pool) computes its
    windows from the input's size, including maps smaller than the output."""
    pool = nn.AdaptiveAvgPool2d((7, 5))
    dims = {"input": {2: torch.export.Dim("h", max=512), 3: torch.export.Dim("w", max=512)}}
    program = torch.export.export(pool, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=dims)
    path = str(tmp_path / "pool.onnx")
    torch.onnx.export(program, dynamo=True, custom_translation_table=onnx_translations(), verbose=False).save(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for h, w in [(4, 4), (7, 5), (13, 29), (100, 3), (64, 96)]:
        x = torch.randn(2, 3, h, w, generator=g)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, pool(x), atol=1e-6, rtol=0, msg=f"{h} x {w}")


@pytest.mark.slow
def test_demo_draws_with_an_exported_model(exported, tmp_path):
    name, fmt, _, directory, _ = exported
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
