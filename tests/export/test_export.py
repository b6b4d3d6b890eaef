"""Export of the inference graph (torch.export program, ONNX file run by ONNX Runtime) and the
runtime that post-processes its outputs: the exported graph reproduces the eager model at
input sizes other than the example's, bad input gets a clear error, and the runtime works in a
process without aff_seg."""
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
from detectron2.modeling import build_model

from ..tools.conftest import ROOT, TINY_OPTS

SYNTHETIC_ADE = os.path.join(ROOT, "configs/synthetic/ade20k_semantic.yaml")
EXAMPLE = (128, 128)
# multiples of 32 that differ from the example and take its branches (local attention in
# stages 1-3, global in stage 4 for the tiny model: 4096 < H*W <= 16384)
SIZES = [(96, 128), (96, 96), (64, 160)]
# Exporting the tiny model takes about 165 s of CPU (torch.export) plus the ONNX conversion; the
# ONNX round trip of the whole model has not run to completion yet (on this project's shared
# machine), so the model-level round trips stay opt-in until it has.
export_run = pytest.mark.skipif(
    os.environ.get("AFF_SEG_EXPORT_TESTS") != "1",
    reason="model export round trips are opt-in (AFF_SEG_EXPORT_TESTS=1): minutes of CPU",
)


def tiny_cfg(*extra):
    cfg = load_config(SYNTHETIC_ADE, TINY_OPTS + ["MODEL.DEVICE", "cpu"] + list(extra))
    cfg.freeze()
    return cfg


def tiny_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model and its export directory per format (one torch.export for both)."""
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    program, settings = export_program(model, cfg, EXAMPLE, config_file=SYNTHETIC_ADE)
    directories = {}
    for fmt in FORMATS:
        directories[fmt] = str(tmp_path_factory.mktemp(fmt))
        save(program, settings, directories[fmt], fmt)
    return model, directories


def eager_raw(model, x):
    with torch.no_grad():
        features = model.backbone(x)
        out = model.sem_seg_head(features)
    return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"],
            **{f"res{i}_pos": features[f"res{i}_pos"] for i in range(2, 6)}}


@pytest.mark.slow
@export_run
@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_graph_matches_eager_at_other_sizes(exported, fmt):
    model, directories = exported
    deployed = runtime.ExportedModel(directories[fmt])
    g = torch.Generator().manual_seed(0)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w, generator=g)
        expected, got = eager_raw(model, x), deployed.raw(x)
        for key in ("pred_logits", "pred_masks"):
            assert got[key].shape == expected[key].shape, (key, h, w)
            assert (got[key] - expected[key]).abs().max() <= 1e-4, (key, h, w)
        for i in range(2, 6):  # the same kept tokens, in the same order, per stage
            assert torch.equal(got[f"res{i}_pos"], expected[f"res{i}_pos"]), (i, h, w)
        # the post-processed semantic segmentation
        image = torch.randint(0, 256, (3, h - 7, w - 5), generator=g).float()
        ours = deployed([{"image": image}])[0]["sem_seg"].argmax(0)
        eager = model([{"image": image}])[0]["sem_seg"].argmax(0)
        assert (ours == eager).float().mean() >= 0.999


@pytest.mark.slow
@export_run
def test_bad_input_gets_a_clear_error(exported):
    _, directories = exported
    deployed = runtime.ExportedModel(directories["onnx"])
    div, lo = deployed.input["size_divisibility"], deployed.input["min_size"]
    with pytest.raises(ValueError, match="not a multiple of the size divisibility"):
        deployed.raw(torch.zeros(1, 3, 128, 128 + div // 2))
    with pytest.raises(ValueError, match="outside the exported range"):
        deployed.raw(torch.zeros(1, 3, lo - div, 128))
    with pytest.raises(ValueError, match="1 x 3 x H x W"):
        deployed.raw(torch.zeros(1, 4, 128, 128))
    with pytest.raises(TypeError, match="float32"):
        deployed.raw(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))


@pytest.mark.slow
@export_run
def test_runtime_predicts_in_a_process_without_aff_seg(exported, tmp_path):
    """Both formats, loaded by a fresh interpreter that cannot import aff_seg (runtime.py copied
    next to the models, the repository off the path)."""
    model, directories = exported
    shutil.copy(runtime.__file__, tmp_path / "deploy_runtime.py")
    script = textwrap.dedent(f"""
        import sys
        import torch
        import deploy_runtime
        for name, directory in {sorted(directories.items())!r}:
            torch.manual_seed(1)
            image = torch.randint(0, 256, (3, 90, 120)).float()
            result = deploy_runtime.ExportedModel(directory)([{{"image": image}}])[0]
            torch.save(result["sem_seg"], name + ".pt")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("aff_seg", "clusten", "detectron2"))
        assert not loaded, loaded
    """)
    env = dict(os.environ, PYTHONPATH="")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=600)
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 90, 120)).float()
    with torch.no_grad():
        eager = model([{"image": image}])[0]["sem_seg"]
    for fmt in FORMATS:
        got = torch.load(tmp_path / f"{fmt}.pt")
        assert got.shape == eager.shape, fmt
        assert (got.argmax(0) == eager.argmax(0)).float().mean() >= 0.999, fmt
