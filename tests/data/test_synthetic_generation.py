"""The synthetic generator: determinism, idempotency, guards, and content a model can learn."""
import importlib.util
import os

import numpy as np
import pytest

import aff_seg  # noqa: F401
from aff_seg.data.synthetic import (
    KINDS,
    VOID,
    make_scene,
    make_synthetic_datasets,
    synthetic_sample,
)

TINY = dict(num_train=2, num_val=1)


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    make_synthetic_datasets(a, seed=1, **TINY)
    make_synthetic_datasets(b, seed=1, **TINY)
    make_synthetic_datasets(c, seed=2, **TINY)
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert len(files_a) > 40
    assert files_a == files_b
    images = [p for p in files_a if p.endswith((".jpg", "_leftImg8bit.png"))]
    assert images and all(files_a[p] != files_c[p] for p in images)


def test_second_call_is_instant_other_arguments_rewrite(tmp_path):
    root = str(tmp_path)
    make_synthetic_datasets(root, datasets=("ade20k",), **TINY)
    label_dir = os.path.join(root, "ADEChallengeData2016", "annotations_detectron2", "training")
    first = {n: os.stat(os.path.join(label_dir, n)).st_mtime_ns for n in os.listdir(label_dir)}
    make_synthetic_datasets(root, datasets=("ade20k",), **TINY)
    assert {n: os.stat(os.path.join(label_dir, n)).st_mtime_ns
            for n in os.listdir(label_dir)} == first
    make_synthetic_datasets(root, datasets=("ade20k",), num_train=3, num_val=1)
    assert len(os.listdir(label_dir)) == 3


def test_real_data_is_never_overwritten(tmp_path):
    real = tmp_path / "coco" / "annotations"
    real.mkdir(parents=True)
    (real / "instances_train2017.json").write_text("{}")
    with pytest.raises(FileExistsError, match=str(tmp_path / "coco")):
        make_synthetic_datasets(str(tmp_path), datasets=("coco",), **TINY)
    assert (real / "instances_train2017.json").read_text() == "{}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(datasets=("ade20k", "voc")), "voc"),
    (dict(num_train=0), "num_train"),
    (dict(min_side=100, max_side=50), "min_side"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_datasets(str(tmp_path), **kwargs)


def test_scene_has_a_full_background_and_many_visible_things():
    rng = np.random.default_rng(0)
    scene = make_scene(rng, 96, 128, max_things=20, min_thing_area=20)
    kinds = scene.kind_map()
    assert kinds.shape == (96, 128)
    assert not KINDS[scene.regions[0][0]].is_thing
    area = np.bincount(scene.region_map.ravel(), minlength=len(scene.regions))
    things = [i for i, (k, _) in enumerate(scene.regions) if k != VOID and KINDS[k].is_thing]
    assert len(things) >= 3
    assert all(area[i] >= 20 for i in things)
    with pytest.raises(ValueError, match="16 x 16"):
        make_scene(rng, 8, 64)


def test_images_show_their_labels():
    """A nearest-mean-colour pixel classifier fitted on train images labels val pixels far
    better than the majority class: images and labels agree, and kinds look different."""
    def pixels(split, count):
        colours, kinds = [], []
        for index in range(count):
            scene, image = synthetic_sample(5, "ade20k", split, index)
            kind = scene.kind_map().ravel()
            colours.append(image.reshape(-1, 3)[kind != VOID].astype(np.float64))
            kinds.append(kind[kind != VOID])
        return np.concatenate(colours), np.concatenate(kinds)

    colours, kinds = pixels("train", 6)
    means = np.stack([colours[kinds == k].mean(axis=0) for k in range(len(KINDS))])
    val_colours, val_kinds = pixels("val", 3)
    predicted = np.argmin(((val_colours[:, None] - means[None]) ** 2).sum(axis=-1), axis=1)
    accuracy = np.mean(predicted == val_kinds)
    majority = np.bincount(val_kinds).max() / len(val_kinds)
    assert accuracy > majority + 0.3


def test_command_line_tool(tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools",
                        "make_synthetic_datasets.py")
    spec = importlib.util.spec_from_file_location("make_synthetic_datasets", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--root", str(tmp_path), "--datasets", "ade20k", "--num-train", "2",
               "--num-val", "1", "--seed", "4"])
    assert "ade20k" in capsys.readouterr().out
    images = tmp_path / "ADEChallengeData2016" / "images"
    assert len(os.listdir(images / "training")) == 2
    assert len(os.listdir(images / "validation")) == 1
    assert not (tmp_path / "coco").exists()
