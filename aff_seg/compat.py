"""Run-time fixes that let detectron2 v0.6 work with today's libraries.

``aff_seg/__init__.py`` calls ``apply()`` before anything touches detectron2.  Nothing is edited
inside site-packages; each fix is a no-op where the library already behaves.

1. Pillow >= 10 removed ``PIL.Image.LINEAR``; ``detectron2.data.transforms`` reads it at
   import time.  It is aliased to ``BILINEAR`` (the same filter).
2. numpy >= 1.24 removed the ``np.int``/``np.float``/``np.str``/``np.object`` aliases of the
   builtins; ``SemSegEvaluator`` and ``detectron2.data.build`` use them.  numpy 2.4 removed
   ``np.in1d``, which cityscapesscripts' instance evaluation calls: it is ``isin`` on the
   flattened first argument.
3. The pb1-detectron2 sdist has no C++ sources, so ``detectron2._C`` does not exist and the
   modules that import it at import time fail.  A stub module takes its place; calling any
   of its functions raises an error that says which pure-Python path to use instead.
4. ``detectron2/export/__init__.py`` imports caffe2, which torch 2 no longer ships, so
   ``detectron2.utils.analysis`` (FLOP counting) cannot import.  The package is registered
   without running that ``__init__``, exposing its caffe2-free ``TracingAdapter``.
5. cityscapesscripts' instance evaluation writes its matches with ``json.dumps(default=lambda
   o: o.__dict__)``; with numpy 2 those hold numpy scalars, which have no ``__dict__``.  Its
   ``writeDict2JSON`` is replaced by one that also writes numpy scalars.
6. detectron2's Cityscapes panoptic loader derives each image's ``labelTrainIds`` file by
   cutting the whole path at its first dot, so any dataset root with a dot in it (``/home/j.doe``,
   ``mktemp -d``) fails with "Please generate labelTrainIds.png".  The loader is replaced by one
   that changes only the file name and the ``leftImg8bit`` folder.
"""
import importlib.util
import json
import os
import sys
import types

import numpy as np
from PIL import Image

__all__ = ["apply"]

_NUMPY_ALIASES = {"int": int, "float": float, "str": str, "object": object, "bool": bool}


class _MissingExtension(types.ModuleType):
    """Stand-in for ``detectron2._C``: imports fine, fails clearly when used."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _unavailable(*args, **kwargs):
            raise RuntimeError(
                f"detectron2._C.{name} is unavailable: detectron2 was installed without its "
                "C++ extension (see README, Install). Use the pure-Python path instead, e.g. "
                "COCOEvaluator(..., use_fast_impl=False)."
            )

        return _unavailable


def _fix_pillow():
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _in1d(ar1, ar2, assume_unique=False, invert=False):
    return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)


def _fix_numpy():
    for name, builtin in _NUMPY_ALIASES.items():
        if name not in vars(np):  # vars(): getattr would trigger numpy's deprecation warnings
            setattr(np, name, builtin)
    if "in1d" not in vars(np):
        np.in1d = _in1d


def _fix_detectron2_c():
    if "detectron2._C" in sys.modules:
        return
    try:
        real = importlib.util.find_spec("detectron2._C")
    except ModuleNotFoundError:  # detectron2 itself is absent: nothing to fix
        return
    if real is None:
        sys.modules["detectron2._C"] = _MissingExtension("detectron2._C")


def _fix_detectron2_export():
    if "detectron2.export" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("detectron2.export")
    except ModuleNotFoundError:
        return
    if spec is None or importlib.util.find_spec("caffe2") is not None:
        return
    package = importlib.util.module_from_spec(spec)  # its __init__ is not executed
    sys.modules["detectron2.export"] = package
    from detectron2.export.flatten import TracingAdapter

    package.TracingAdapter = TracingAdapter


def _write_dict_to_json(dict_name, file_name):
    """cityscapesscripts' ``writeDict2JSON``, also for numpy scalars."""
    def encode(o):
        return o.item() if isinstance(o, np.generic) else o.__dict__

    with open(file_name, "w") as f:
        f.write(json.dumps(dict_name, default=encode, sort_keys=True, indent=4))


def _fix_cityscapesscripts_json():
    try:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as instance_eval
        from cityscapesscripts.helpers import csHelpers
    except ImportError:  # cityscapesscripts is optional for the rest of detectron2
        return
    csHelpers.writeDict2JSON = _write_dict_to_json
    instance_eval.writeDict2JSON = _write_dict_to_json  # bound there by a star import


def _cityscapes_train_id_file(image_file):
    """``<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` ->
    ``<root>/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png``."""
    city_dir, name = os.path.split(image_file)
    split_dir, city = os.path.split(city_dir)
    images_dir, split = os.path.split(split_dir)
    stem = name[: -len("_leftImg8bit.png")] if name.endswith("_leftImg8bit.png") else name.split(".")[0]
    return os.path.join(os.path.dirname(images_dir), "gtFine", split, city, stem + "_gtFine_labelTrainIds.png")


def _load_cityscapes_panoptic(image_dir, gt_dir, gt_json, meta):
    """detectron2's ``load_cityscapes_panoptic`` with the ``labelTrainIds`` path derived from
    the file name only (same records, same checks)."""
    from detectron2.data.datasets import cityscapes_panoptic

    if not os.path.exists(gt_json):
        raise FileNotFoundError(
            f"{gt_json} does not exist: run cityscapesscripts/preparation/createPanopticImgs.py"
        )
    with open(gt_json) as f:
        json_info = json.load(f)
    things = meta["thing_dataset_id_to_contiguous_id"]
    stuff = meta["stuff_dataset_id_to_contiguous_id"]
    records = []
    for image_file, label_file, segments_info in cityscapes_panoptic.get_cityscapes_panoptic_files(
        image_dir, gt_dir, json_info
    ):
        for segment in segments_info:
            category = segment["category_id"]
            segment["category_id"] = things[category] if category in things else stuff[category]
        stem = os.path.splitext(os.path.basename(image_file))[0]
        records.append(
            {
                "file_name": image_file,
                "image_id": "_".join(stem.split("_")[:3]),
                "sem_seg_file_name": _cityscapes_train_id_file(image_file),
                "pan_seg_file_name": label_file,
                "segments_info": segments_info,
            }
        )
    if not records:
        raise FileNotFoundError(f"no Cityscapes images found in {image_dir}")
    for key, how in (
        ("sem_seg_file_name", "cityscapesscripts/preparation/createTrainIdLabelImgs.py"),
        ("pan_seg_file_name", "cityscapesscripts/preparation/createPanopticImgs.py"),
    ):
        if not os.path.isfile(records[0][key]):
            raise FileNotFoundError(f"{records[0][key]} does not exist: run {how}")
    return records


def _fix_cityscapes_panoptic_paths():
    try:
        from detectron2.data.datasets import cityscapes_panoptic
    except ImportError:
        return
    # register_cityscapes_panoptic looks the loader up in its module when a dataset is loaded
    cityscapes_panoptic.load_cityscapes_panoptic = _load_cityscapes_panoptic


def apply():
    """Apply every fix (idempotent).  The export fix imports detectron2 modules: it goes last."""
    _fix_pillow()
    _fix_numpy()
    _fix_detectron2_c()
    _fix_detectron2_export()
    _fix_cityscapesscripts_json()
    _fix_cityscapes_panoptic_paths()
