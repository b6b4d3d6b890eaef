"""MODEL_ZOO.md names configs that exist, whose backbone and ImageNet checkpoint match the row."""
import glob
import os
import re

import pytest

from aff_seg import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = open(os.path.join(ROOT, "MODEL_ZOO.md")).read()
ROWS = [line for line in ZOO.splitlines() if line.startswith("| AFF-")]


def _segmentation_rows():
    for line in ROWS:
        config = re.search(r"`(configs/[^`]+\.yaml)`", line)
        if config:
            yield line, config.group(1)


@pytest.mark.parametrize("row, config", list(_segmentation_rows()))
def test_segmentation_row_names_a_matching_config(row, config):
    assert os.path.isfile(os.path.join(ROOT, config)), config
    url = re.search(r"\((https://[^)]+\.pth)\)", row)
    model = os.path.basename(config).split("_bs")[0][len("maskformer2_"):]  # aff_tiny_1_5th ...
    if url:  # the checkpoint of that model, for that task
        assert os.path.basename(url.group(1)) == model + ".pth", row
        task = {"ade_sem": "ade20k/semantic", "city_ins": "cityscapes/instance",
                "city_pan": "cityscapes/panoptic", "coco_ins": "coco/instance"}[url.group(1).split("/")[-2]]
        assert config.startswith("configs/" + task), row


def test_every_imagenet_checkpoint_is_used_by_the_configs_it_names():
    for row in ROWS:
        used = re.search(r"`(maskformer2_[^`]+\.yaml)` \(`([^`]+\.pkl)`\)", row)
        if not used:
            continue
        configs = glob.glob(os.path.join(ROOT, "configs", "*", "*", "aff", used.group(1)))
        assert configs, row
        for config in configs:
            assert load_config(config).MODEL.WEIGHTS == used.group(2), config


def test_every_aff_segmentation_config_is_listed():
    # the original's model family (other heads on AFF, e.g. faseg_*, have no published checkpoint)
    configs = sorted(os.path.relpath(p, ROOT)
                     for p in glob.glob(os.path.join(ROOT, "configs/*/*/aff/maskformer2_aff_*.yaml")))
    published = {c for _, c in _segmentation_rows()}
    unlisted = [c for c in configs if c not in published]
    # the ones without a published checkpoint: COCO panoptic and Cityscapes semantic (this
    # repository's additions), AFF-Base
    assert all("coco/panoptic" in c or "cityscapes/semantic" in c or "aff_base" in c for c in unlisted), unlisted
