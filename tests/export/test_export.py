"""Export of an AFF + Mask2Former model (torch.export program, ONNX file run by ONNX Runtime) and
the runtime that post-processes its outputs: the exported graph reproduces the eager model at
input sizes other than the example's (raw outputs, kept tokens, semantic, panoptic and instance
results), bad input gets a clear error, and the runtime works in a process without aff_seg.

One tiny random model (the structure of the COCO panoptic AFF-Tiny config, a few channels, one
block per stage) is exported once for all tests; the AFF-Mini/Tiny configs of every dataset are
exported at their size by the opt-in test at the end (AFF_SEG_EXPORT_TESTS=1: minutes of CPU)."""
import os
import shutil
import subprocess
import sys
import textwrap

import onnxruntime
import pytest
import torch
from torch import nn

from aff_seg.config import load_config
from aff_seg.export import runtime
from aff_seg.export.exporter import FORMATS, check_exportable, export_program, onnx_translations, save
from aff_seg.modeling.backbone.merging import reserve_count
from aff_seg.modeling.point_utils import shepard_weights
from detectron2.modeling import build_model

from ..tools.conftest import ROOT, import_script
from .helpers import Searches, assert_same_panoptic_and_instances, exported_searches, search_cases

# semantic, panoptic and instance results (TEST.SEMANTIC_ON / PANOPTIC_ON / INSTANCE_ON)
COCO_PANOPTIC = os.path.join(ROOT, "configs/coco/panoptic-segmentation/aff/maskformer2_aff_tiny_bs64_50ep.yaml")
TINY = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
    "MODEL.AFF.EMBED_DIM", "[8, 8, 16, 16]", "MODEL.AFF.DEPTHS", "[1, 1, 1, 1]",
    "MODEL.AFF.NUM_HEADS", "[1, 1, 1, 1]", "MODEL.AFF.CLUSTER_SIZE", "2",
    # local attention in every stage from 64 x 96 to 2048 x 2048 pixels
    "MODEL.AFF.NBHD_SIZE", "[8, 8, 8, 2]",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "MODEL.SEM_SEG_HEAD.MASK_DIM", "16",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "16", "MODEL.MASK_FORMER.NHEADS", "1",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "32", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
]
EXAMPLE = (128, 128)
# multiples of 32 that differ from the example
SIZES = [(96, 160), (192, 128), (128, 96)]


def tiny_cfg(*extra):
    cfg = load_config(COCO_PANOPTIC, TINY + list(extra))
    cfg.freeze()
    return cfg


def test_tta_is_refused_by_name():
    with pytest.raises(ValueError, match=r"test-time augmentation \(TEST.AUG.ENABLED=True\)"):
        check_exportable(tiny_cfg("TEST.AUG.ENABLED", "True"))


class SortsAndMaxima(nn.Module):
    """The reductions the exporter translates itself: stable sorts (both directions) and amax."""

    def forward(self, x):
        descending = torch.sort(x, dim=1, descending=True, stable=True)[1]
        ascending = torch.sort(x, dim=1, stable=True)[1]
        return descending, ascending, x.amax(), x.amax(dim=1)


@pytest.mark.slow
def test_onnx_translations_match_torch(tmp_path):
    """Stable sort as ONNX TopK (ties to the lower index) and amax over all dimensions, run by
    ONNX Runtime at sizes other than the example's, with many ties."""
    module = SortsAndMaxima()
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, 4, (2, 40), generator=g).float()
    program = torch.export.export(module, (example,), dynamic_shapes={"x": {1: torch.export.Dim("n", min=2, max=4096)}})
    path = str(tmp_path / "sorts.onnx")
    torch.onnx.export(program, dynamo=True, custom_translation_table=onnx_translations(), verbose=False).save(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (3, 97, 1000):
        x = torch.randint(0, 4, (2, n), generator=g).float()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for name, ours, expected in zip(("descending", "ascending", "amax", "amax(dim=1)"), got, module(x)):
            assert torch.equal(torch.from_numpy(ours), expected), (name, n)


class ShepardWeights(nn.Module):
    def forward(self, dist2):
        return shepard_weights(dist2, 3.0)


@pytest.mark.slow
def test_onnx_keeps_the_shepard_epsilon(tmp_path):
    """A sample on a token (distance 0) gets weight 1, not NaN: the ONNX file keeps the 1e-11 of
    ``1 / (d^(2p) + 1e-11)`` (onnxscript's optimizer drops additions of constants below 1e-8)."""
    dist2 = torch.tensor([[[0.0, 1.0, 4.0, 9.0], [0.25, 1.0, 2.0, 3.0]]])
    program = torch.export.export(ShepardWeights(), (dist2,))
    path = str(tmp_path / "shepard")
    save(program, {"outputs": ["weights"]}, path, "onnx")
    session = onnxruntime.InferenceSession(os.path.join(path, runtime.MODEL_FILES["onnx"]),
                                           providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: dist2.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), ShepardWeights()(dist2), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_exported_searches_match_eager(tmp_path, monkeypatch):
    """The exported neighbour searches (a scan over fixed-size query chunks; a window on a pixel
    grid), as a torch.export program and in ONNX Runtime, at point counts other than the
    example's, with many ties."""
    program = exported_searches(monkeypatch)
    path = str(tmp_path / "searches")
    save(program, {"outputs": ["idx", "dist", "grid_idx", "grid_dist"]}, path, "onnx")
    session = onnxruntime.InferenceSession(os.path.join(path, runtime.MODEL_FILES["onnx"]),
                                           providers=["CPUExecutionProvider"])
    for case in search_cases():
        expected = Searches()(*case)
        onnx_out = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), case)})
        for ours, program_out, want in zip(onnx_out, program.module()(*case), expected):
            assert torch.equal(program_out, want) and torch.equal(torch.from_numpy(ours), want)


class ReservedGrid(nn.Module):
    def forward(self, canvas):
        return torch.zeros(reserve_count(canvas.shape[-2], canvas.shape[-1], 8))


@pytest.mark.slow
def test_onnx_rounds_the_reserved_grid_up(tmp_path):
    """The reserved-token count (a ceil division of the canvas size) at canvas sizes that do not
    divide: the ONNX file rounds up as torch does (a truncating Div would round down)."""
    rows, cols = torch.export.Dim("rows", min=17, max=512), torch.export.Dim("cols", min=17, max=512)
    program = torch.export.export(ReservedGrid(), (torch.zeros(1, 32, 32),),
                                  dynamic_shapes={"canvas": {1: rows, 2: cols}})
    path = str(tmp_path / "reserve")
    save(program, {"outputs": ["reserved"]}, path, "onnx")
    session = onnxruntime.InferenceSession(os.path.join(path, runtime.MODEL_FILES["onnx"]),
                                           providers=["CPUExecutionProvider"])
    for h, w in ((24, 40), (17, 33), (48, 32)):
        (got,) = session.run(None, {session.get_inputs()[0].name: torch.zeros(1, h, w).numpy()})
        assert got.shape == (reserve_count(h, w, 8),) == (-(-h // 16) * -(-w // 16),), (h, w)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model and, per format, its export directory and runtime (one torch.export for both)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    program, settings = export_program(model, cfg, EXAMPLE, config_file=COCO_PANOPTIC)
    directories, deployed = {}, {}
    for fmt in FORMATS:
        directories[fmt] = str(tmp_path_factory.mktemp(fmt))
        save(program, settings, directories[fmt], fmt)
        deployed[fmt] = runtime.ExportedModel(directories[fmt])
    return model, directories, deployed


def eager_raw(model, x):
    with torch.no_grad():
        features = model.backbone(x)
        out = model.sem_seg_head(features)
    return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"],
            **{f"res{i}_pos": features[f"res{i}_pos"] for i in range(2, 6)}}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_graph_matches_eager_at_other_sizes(exported, fmt):
    model, _, deployed = exported
    deployed = deployed[fmt]
    g = torch.Generator().manual_seed(0)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w, generator=g)
        expected, got = eager_raw(model, x), deployed.raw(x)
        assert sorted(got) == sorted(expected)
        for key in ("pred_logits", "pred_masks"):
            assert got[key].shape == expected[key].shape, (key, h, w)
            assert (got[key] - expected[key]).abs().max() <= 1e-4, (key, h, w)
        for i in range(2, 6):  # the same kept tokens, in the same order, per stage
            assert torch.equal(got[f"res{i}_pos"], expected[f"res{i}_pos"]), (i, h, w)
        # the post-processed semantic segmentation, resized to another output size
        image = torch.randint(0, 256, (3, h - 7, w - 5), generator=g).float()
        item = {"image": image, "height": h + 9, "width": w - 20}
        ours = deployed([item])[0]["sem_seg"]
        with torch.no_grad():
            eager = model([item])[0]["sem_seg"]
        assert ours.shape == eager.shape
        assert (ours.argmax(0) == eager.argmax(0)).float().mean() >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_panoptic_and_instance_results_match_eager(exported, fmt, monkeypatch):
    model, _, deployed = exported
    deployed = deployed[fmt]
    # keep every query and segment of the random model
    monkeypatch.setattr(model, "object_mask_threshold", 0.0)
    monkeypatch.setattr(model, "overlap_threshold", 0.0)
    monkeypatch.setitem(deployed.settings, "postprocess", model.postprocess_settings())
    image = torch.randint(0, 256, (3, 150, 210), generator=torch.Generator().manual_seed(1)).float()
    ours = deployed([{"image": image}])[0]
    with torch.no_grad():
        eager = model([{"image": image}])[0]
    assert sorted(ours) == sorted(eager) == ["instances", "panoptic_seg", "sem_seg"]
    assert_same_panoptic_and_instances(ours, eager)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input_gets_a_clear_error(exported, fmt):
    deployed = exported[2][fmt]
    div, lo = deployed.input["size_divisibility"], deployed.input["min_size"]
    with pytest.raises(ValueError, match="not a multiple of the size divisibility"):
        deployed.raw(torch.zeros(1, 3, 128, 128 + div // 2))
    with pytest.raises(ValueError, match="outside the exported range"):
        deployed.raw(torch.zeros(1, 3, lo - div, 128))
    # at 64 x 64 stage 3 reserves a single grid token: a branch the 128 x 128 export does not take
    with pytest.raises(ValueError, match="a single reserved token"):
        deployed.raw(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="1 x 3 x H x W"):
        deployed.raw(torch.zeros(1, 4, 128, 128))
    with pytest.raises(ValueError, match="float32"):
        deployed.raw(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))


@pytest.mark.slow
def test_runtime_predicts_in_a_process_without_aff_seg(exported, tmp_path):
    """The ONNX model, loaded by a fresh interpreter that cannot import aff_seg (runtime.py copied
    next to the model, the repository off the path)."""
    model, directories, _ = exported
    shutil.copy(runtime.__file__, tmp_path / "deploy_runtime.py")
    script = textwrap.dedent(f"""
        import sys
        import torch
        import deploy_runtime
        torch.manual_seed(1)
        image = torch.randint(0, 256, (3, 90, 120)).float()
        deployed = deploy_runtime.ExportedModel({directories["onnx"]!r})
        deployed.settings["postprocess"]["instance_on"] = False  # Instances are detectron2's structures
        result = deployed([{{"image": image}}])[0]
        torch.save(result["sem_seg"], "sem_seg.pt")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("aff_seg", "clusten", "detectron2"))
        assert not loaded, loaded
    """)
    env = dict(os.environ, PYTHONPATH="")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=600)
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 90, 120)).float()
    with torch.no_grad():
        eager = model([{"image": image}])[0]["sem_seg"]
    got = torch.load(tmp_path / "sem_seg.pt")
    assert got.shape == eager.shape
    assert (got.argmax(0) == eager.argmax(0)).float().mean() >= 0.999


# every AFF-Mini/Tiny config of the three datasets and three tasks
AFF_CONFIGS = sorted(
    os.path.relpath(os.path.join(folder, name), ROOT)
    for folder in (os.path.join(ROOT, "configs", d, t, "aff") for d in ("ade20k", "coco", "cityscapes")
                   for t in ("semantic-segmentation", "panoptic-segmentation", "instance-segmentation"))
    if os.path.isdir(folder)
    for name in os.listdir(folder)
    if name.startswith("maskformer2_aff_") and ("_mini_bs" in name or "_tiny_bs" in name)
)


def test_every_aff_mini_tiny_config_is_listed():
    datasets = {path.split(os.sep)[1] + "/" + path.split(os.sep)[2] for path in AFF_CONFIGS}
    assert datasets == {"ade20k/semantic-segmentation", "coco/panoptic-segmentation", "coco/instance-segmentation",
                        "cityscapes/semantic-segmentation", "cityscapes/panoptic-segmentation",
                        "cityscapes/instance-segmentation"}
    assert len(AFF_CONFIGS) == 12


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("AFF_SEG_EXPORT_TESTS") != "1",
                    reason="one export per config (about 2 min of CPU each): opt-in, AFF_SEG_EXPORT_TESTS=1")
@pytest.mark.parametrize("config", AFF_CONFIGS)
def test_aff_config_exports_through_the_tool(config, tmp_path):
    """tools/export_model.py on the config (its classes, test settings and decoder; few channels and
    one block per stage), torch.export; the program matches eager at another size."""
    opts = [o for o in TINY if o not in ("MODEL.DEVICE", "cpu")]
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, config), TINY)
    model = build_model(cfg).eval()
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    out = str(tmp_path / "export")
    import_script("tools", "export_model").main([
        "--config-file", os.path.join(ROOT, config), "--format", "torch_export", "--output", out,
        "--example-size", *map(str, EXAMPLE), *opts, "MODEL.WEIGHTS", weights])
    deployed = runtime.ExportedModel(out)
    assert deployed.settings["postprocess"] == model.postprocess_settings()
    x = torch.randn(1, 3, *SIZES[0], generator=torch.Generator().manual_seed(0))
    expected, got = eager_raw(model, x), deployed.raw(x)
    for key in ("pred_logits", "pred_masks"):
        assert (got[key] - expected[key]).abs().max() <= 1e-4, key
    for i in range(2, 6):
        assert torch.equal(got[f"res{i}_pos"], expected[f"res{i}_pos"]), i
