"""Config files cannot run code in any entry point, and the original's eval lists convert."""
import os
import sys

import pytest
import yaml

from .conftest import ADE_MINI, ROOT, import_script

import aff_seg  # noqa: F401
from aff_seg.config import ConfigError, load_config

BASE_ADE = os.path.join(ROOT, "configs/ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml")


def payload(marker):
    """A YAML value that, read with yaml.unsafe_load, creates ``marker``."""
    return f'!!python/object/apply:os.system ["{sys.executable} -c \\"open(\'{marker}\', \'w\')\\""]'


@pytest.fixture(params=["in the file", "in a _BASE_", "under an unknown key"])
def hostile_config(request, tmp_path):
    """(config path, marker path the payload would create, file and line the error must name)."""
    marker = tmp_path / "payload-ran"
    config = tmp_path / "config.yaml"
    if request.param == "in the file":
        config.write_text(f"_BASE_: {ADE_MINI}\nINPUT:\n  MIN_SIZE_TRAIN: {payload(marker)}\n")
        where = (config, 3)
    elif request.param == "in a _BASE_":
        base = tmp_path / "base.yaml"
        base.write_text(f"_BASE_: {ADE_MINI}\nMODEL:\n  WEIGHTS: ''\n  PIXEL_STD: {payload(marker)}\n")
        config.write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 1\n")
        where = (base, 4)
    else:
        config.write_text(f"_BASE_: {ADE_MINI}\nNOT_A_KEY: {payload(marker)}\n")
        where = (config, 2)
    return config, marker, where


def _check_refused(message, marker, where):
    assert not marker.exists(), "the YAML payload ran"
    path, line = where
    assert f"{path}, line {line}" in message
    assert "convert-config-safe.py" in message


def test_unsafe_yaml_is_refused_by_load_config(hostile_config):
    config, marker, where = hostile_config
    with pytest.raises(ConfigError) as e:
        load_config(str(config))
    _check_refused(str(e.value), marker, where)


def test_unsafe_yaml_never_runs_in_train_net(hostile_config):
    config, marker, where = hostile_config
    train_net = import_script("", "train_net")
    with pytest.raises(SystemExit) as e:  # one line: "train_net.py: error: <the ConfigError>"
        train_net.cli(["--config-file", str(config), "--eval-only", "MODEL.DEVICE", "cpu"])
    _check_refused(str(e.value.code), marker, where)


def test_unsafe_yaml_never_runs_in_the_demo(hostile_config, tmp_path, demo, caplog):
    config, marker, where = hostile_config
    logger = demo.logger
    logger.addHandler(caplog.handler)
    try:
        code = demo.main(["--config-file", str(config), "--input", str(tmp_path / "x.jpg"), "--output",
                          str(tmp_path / "out")])
    finally:
        logger.removeHandler(caplog.handler)
    assert code == 2
    _check_refused(caplog.text, marker, where)


def test_unsafe_yaml_never_runs_in_the_tools(hostile_config, analyze_model):
    config, marker, where = hostile_config
    with pytest.raises(ConfigError) as e:
        analyze_model.setup_cfg(str(config), ["MODEL.DEVICE", "cpu"])
    _check_refused(str(e.value), marker, where)


@pytest.mark.parametrize("content", ["", "# only a comment\n", "[1, 2]\n"])
def test_empty_or_non_mapping_config_names_the_file(tmp_path, content):
    base = tmp_path / "base.yaml"
    base.write_text(content)
    config = tmp_path / "config.yaml"
    config.write_text("_BASE_: base.yaml\n")
    with pytest.raises(ConfigError, match=f"config file {base} (is empty|must hold a mapping)"):
        load_config(str(config))


ORIGINAL_BASE = """\
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 512) for x in range(5, 21)]"]
  MIN_SIZE_TRAIN_SAMPLING: "choice"
  MAX_SIZE_TEST: 2048
"""


def test_converter_rewrites_the_original_eval_lists(tmp_path):
    convert = import_script("tools", "convert-config-safe")
    original = tmp_path / "Base-ADE20K.yaml"
    original.write_text(ORIGINAL_BASE)
    with pytest.raises(ConfigError, match="line 2"):
        load_config(str(original))
    assert convert.main([str(original)]) == 0
    converted = yaml.safe_load(original.read_text())
    with open(BASE_ADE) as f:  # the project's copy of the original writes the list out
        shipped = yaml.safe_load(f)
    assert converted["INPUT"]["MIN_SIZE_TRAIN"] == shipped["INPUT"]["MIN_SIZE_TRAIN"]
    assert converted["INPUT"]["MIN_SIZE_TRAIN"][:3] == [256, 307, 358]
    assert load_config(str(original)).INPUT.MIN_SIZE_TRAIN == tuple(shipped["INPUT"]["MIN_SIZE_TRAIN"])


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')",
    "[open('x') for x in range(3)]",
    "[x for x in range(10**9)]",
    "[x.real for x in range(3)]",
])
def test_converter_refuses_anything_but_number_lists(tmp_path, expression):
    convert = import_script("tools", "convert-config-safe")
    original = tmp_path / "c.yaml"
    text = f'A: 1\nB: !!python/object/apply:eval ["{expression}"]\n'
    original.write_text(text)
    assert convert.main([str(original)]) == 1
    assert original.read_text() == text  # left unchanged
    with pytest.raises(convert.UnsupportedExpression, match="line 2"):
        convert.convert_text(text, "c.yaml")


def test_converter_refuses_other_tags():
    convert = import_script("tools", "convert-config-safe")
    with pytest.raises(convert.UnsupportedExpression, match="c.yaml, line 1: .*os.system"):
        convert.convert_text('A: !!python/object/apply:os.system ["true"]\n', "c.yaml")
