"""Strict checkpoint loading: every kind of mismatch stops --eval-only, the demo and the tools
with a table of the keys; MODEL.WEIGHTS_STRICT False and backbone-only (classification)
checkpoints load what fits and list what was left as initialised; checksums catch flipped bytes."""
import logging

import pytest
import torch
from detectron2.modeling import build_model

import aff_seg
from aff_seg.checkpoint import AFFCheckpointer, CheckpointMismatchError, LoadReport, check_load

CPU = ["MODEL.DEVICE", "cpu"]
OTHER_SIZE = ["MODEL.AFF.EMBED_DIM", "[16, 16, 32, 48]", "MODEL.AFF.NUM_HEADS", "[1, 1, 2, 3]"]


@pytest.fixture(scope="module")
def tiny(tiny_config):
    """Builds the tiny model (seed 0) with extra overrides."""
    config, opts = tiny_config

    def build(*extra):
        torch.manual_seed(0)
        return build_model(aff_seg.load_config(config, opts + CPU + list(extra))).eval()
    return build


def write(path, state):
    torch.save({"model": state}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    """Checkpoint files that do not fit the tiny model, one per kind of mismatch."""
    root = tmp_path_factory.mktemp("checkpoints")
    state = tiny().state_dict()
    keys = sorted(state)
    return {
        "other size": write(root / "other_size.pth", tiny(*OTHER_SIZE).state_dict()),
        "half missing": write(root / "half.pth", {k: state[k] for k in keys[::2]}),
        "unexpected": write(root / "extra.pth", dict(state, **{"sem_seg_head.extra.weight": torch.zeros(2)})),
        "nothing matches": write(root / "nothing.pth", {"encoder." + k: v for k, v in state.items()}),
        "backbone only": write(root / "backbone.pth", {k: v for k, v in state.items() if k.startswith("backbone.")}),
    }


EXPECTED = {  # a line of the table each case must show
    "other size": "| backbone.norm3.weight",
    "half missing": "missing in the file (left at its initial value)",
    "unexpected": "| sem_seg_head.extra.weight",
    "nothing matches": "no key of the file fits the model",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_every_mismatch_is_refused_with_a_table(tiny, files, case):
    model = tiny()
    with pytest.raises(CheckpointMismatchError) as e:
        AFFCheckpointer(model).load(files[case])
    assert files[case] in str(e.value) and EXPECTED[case] in str(e.value)
    if case == "other size":
        assert " ".join(str(e.value).split()).count("| shape differs (not loaded) | (48,) | (32,) |") >= 3
        assert "MODEL.WEIGHTS_STRICT False" in str(e.value)


def test_weights_strict_false_loads_what_fits_and_lists_the_rest(tiny, files, caplog):
    model, reference = tiny(), tiny(*OTHER_SIZE)
    with caplog.at_level(logging.WARNING):
        AFFCheckpointer(model, strict=False).load(files["other size"])
    loaded = model.state_dict()
    assert torch.equal(loaded["sem_seg_head.predictor.class_embed.weight"],
                       reference.state_dict()["sem_seg_head.predictor.class_embed.weight"])
    assert "backbone.norm3.weight" in caplog.text
    with pytest.raises(CheckpointMismatchError, match="no key of the file fits"):
        AFFCheckpointer(model, strict=False).load(files["nothing matches"])


def test_backbone_only_checkpoint_loads_and_reports_exactly_what_stays_random(tiny, files, caplog):
    model = tiny()
    with caplog.at_level(logging.WARNING):
        AFFCheckpointer(model).load(files["backbone only"])
    left = {line.split("|")[1].strip() for line in caplog.text.splitlines()
            if "missing in the file" in line}
    assert left == {k for k in model.state_dict() if not k.startswith("backbone.")}


def test_check_load_is_callable_on_its_own():
    report = LoadReport("w.pth", missing=["a"], loaded=3)
    with pytest.raises(CheckpointMismatchError, match="w.pth: 3 tensors loaded, 1 missing"):
        check_load(report, allow_partial=False)
    check_load(report, allow_partial=True)
    check_load(LoadReport("w.pth", loaded=3), allow_partial=False)


def test_checksum_round_trip_and_flipped_bytes(tiny, tmp_path):
    model = tiny()
    bias = model.sem_seg_head.predictor.class_embed.bias
    with torch.no_grad():  # a byte pattern to find in the file
        bias.copy_(torch.arange(len(bias)) % 4 + 1.0)
    AFFCheckpointer(model, save_dir=str(tmp_path)).save("model_0000009", iteration=9)
    path = tmp_path / "model_0000009.pth"
    assert "tensor_checksum" in torch.load(path, weights_only=True)
    AFFCheckpointer(tiny()).load(str(path))  # verified and clean
    data = bytearray(path.read_bytes())
    needle = torch.tensor([1.0, 2.0, 3.0, 4.0] * 4).numpy().tobytes()
    offset = data.find(needle)
    assert offset > 0
    data[offset + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointMismatchError, match=f"{path}: the tensors do not match the checksum"):
        AFFCheckpointer(tiny()).load(str(path))


# -- entry points -------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_eval_only_refuses_a_checkpoint_that_does_not_fit(files, tmp_path, train_net, tiny_config, case):
    config, opts = tiny_config
    args = train_net.argument_parser().parse_args(
        ["--config-file", config, "--eval-only", *opts, *CPU, "MODEL.WEIGHTS", files[case],
         "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(CheckpointMismatchError) as e:
        train_net.main(args)
    assert EXPECTED[case] in str(e.value)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_demo_refuses_a_checkpoint_that_does_not_fit(files, tmp_path, demo, caplog, tiny_config, case):
    config, opts = tiny_config
    import cv2
    import numpy as np

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 100, np.uint8))
    demo.logger.addHandler(caplog.handler)
    try:
        opts = ["--opts", *opts, "MODEL.WEIGHTS", files[case]]
        common = ["--config-file", config, "--input", str(image), "--output", str(tmp_path / "out")]
        assert demo.main(common + opts) == 2
        assert EXPECTED[case] in caplog.text
        assert not (tmp_path / "out").exists()
        if case != "nothing matches":
            assert demo.main(common + opts + ["MODEL.WEIGHTS_STRICT", "False"]) == 0
    finally:
        demo.logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_tools_refuse_a_checkpoint_that_does_not_fit(files, analyze_model, tiny_config, case):
    config, opts = tiny_config
    cfg = analyze_model.setup_cfg(config, opts + CPU + ["MODEL.WEIGHTS", files[case]])
    with pytest.raises(CheckpointMismatchError) as e:
        analyze_model.build_loaded_model(cfg)
    assert EXPECTED[case] in str(e.value)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_export_refuses_a_checkpoint_that_does_not_fit(files, tiny_config, tmp_path, case):
    from .conftest import import_script

    export_model = import_script("tools", "export_model")
    config, opts = tiny_config
    out = tmp_path / "exported"
    with pytest.raises(CheckpointMismatchError) as e:
        export_model.main(["--config-file", config, "--format", "torch_export", "--output", str(out),
                           "--example-size", "64", "64", *opts, "MODEL.WEIGHTS", files[case]])
    assert EXPECTED[case] in str(e.value)
    assert not out.exists()  # stopped before exporting anything
