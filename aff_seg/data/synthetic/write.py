"""``make_synthetic_datasets``: write the synthetic datasets under a ``DETECTRON2_DATASETS`` folder."""
import json
import os
import shutil

from .ade20k import write_ade20k
from .cityscapes import write_cityscapes
from .coco import write_coco
from .lvis import write_lvis
from .files import FORMAT_VERSION, write_json
from .scene import DATASETS, synthetic_sample

__all__ = ["make_synthetic_datasets"]

_MARKER = ".synthetic.json"


def _read_marker(folder):
    try:
        with open(os.path.join(folder, _MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_synthetic_datasets(root, datasets=tuple(DATASETS), num_train=24, num_val=8, seed=0,
                            min_side=64, max_side=160, cityscapes_size=(128, 256)):
    """Write synthetic datasets under ``root`` (a ``DETECTRON2_DATASETS`` folder).

    A dataset folder already written with the same arguments is kept as is, so a second call
    returns at once; one written with other arguments is rewritten.  A folder that this
    function did not write (real data) is never touched: that raises ``FileExistsError``.

    Args:
        root (str): folder to write into (created if missing).
        datasets (iterable[str]): any of ``"ade20k"``, ``"coco"``, ``"cityscapes"``, ``"lvis"``
            (LVIS v1's json files over COCO's images: it writes ``"coco"`` too).
        num_train, num_val (int): images per split (``num_val`` may be 0: no val split).
        seed (int): the same seed writes the same bytes.
        min_side, max_side (int): ADE20K and COCO image sides are drawn from this range
            (independently, so aspect ratios vary).
        cityscapes_size ((int, int)): height, width of every Cityscapes image.

    Returns:
        dict: dataset -> its folder.
    """
    datasets = [d.strip() for d in ([datasets] if isinstance(datasets, str) else datasets)]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise ValueError(f"datasets: unknown {unknown}; choose from {sorted(DATASETS)}")
    if "lvis" in datasets and "coco" not in datasets:
        datasets.append("coco")  # the images of LVIS
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    counts = {"train": num_train, "val": num_val}
    folders = {}
    for dataset in datasets:
        folder = os.path.join(root, DATASETS[dataset])
        params = {"format_version": FORMAT_VERSION, "num_train": num_train, "num_val": num_val,
                  "seed": seed, "min_side": min_side, "max_side": max_side,
                  "cityscapes_size": list(cityscapes_size)}
        folders[dataset] = folder
        marker = _read_marker(folder)
        if marker == dict(params, complete=True):
            continue
        if os.path.exists(folder):
            if marker is None:
                raise FileExistsError(
                    f"{folder} exists and was not written by make_synthetic_datasets (no "
                    f"{_MARKER}); refusing to overwrite it. Pick another --root.")
            shutil.rmtree(folder)
        os.makedirs(folder)
        write_json(dict(params, complete=False), os.path.join(folder, _MARKER))
        scenes_of = "coco" if dataset == "lvis" else dataset  # LVIS annotates COCO's images
        samples = {
            split: [synthetic_sample(seed, scenes_of, split, i, min_side, max_side,
                                     tuple(cityscapes_size)) for i in range(n)]
            for split, n in counts.items() if n > 0
        }
        if dataset == "ade20k":
            write_ade20k(folder, samples)
        elif dataset == "coco":
            write_coco(folder, samples, {"train": 0, "val": num_train})
        elif dataset == "lvis":
            write_lvis(folder, samples, {"train": 0, "val": num_train})
        else:
            write_cityscapes(folder, samples)
        write_json(dict(params, complete=True), os.path.join(folder, _MARKER))
    return folders
