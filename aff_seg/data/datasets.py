"""Dataset registrations this project adds to detectron2's built-in ones.

detectron2 registers the standard names (COCO, LVIS, Cityscapes, ADE20K ...) when
``detectron2.data.datasets.builtin`` is imported, at paths under ``$DETECTRON2_DATASETS``
(default ``./datasets``) read at that moment.  On top of them, importing this module:

* gives ``ade20k_sem_seg_{train,val}`` the standard 150-colour ADE20K palette as
  ``stuff_colors`` (the original AFF edits detectron2's files for this; nothing here does);
* registers ``lvis_v1_val_cocofied`` (``lvis/lvis_v1_val_cocofied.json``, written by
  ``prepare_cocofied_lvisv1.py``), which the original asks users to paste into detectron2;
* registers ``coco_2017_{train,val}_panoptic_with_sem_seg``: COCO panoptic records that also
  carry ``sem_seg_file_name`` from ``coco/panoptic_semseg_{train,val}2017`` (Mask2Former's
  layout; detectron2 0.6 has no such name), with Mask2Former's metadata, and gives
  ``coco_2017_{train,val}_panoptic`` Mask2Former's 80 ``thing_classes``;
* makes every standard name check its files before loading (``check_dataset_exists``), so a
  missing root or split fails with the path that was expected and how to create it.

``register_standard_datasets(root)`` points all of these names at another root in a running
process (detectron2 reads the environment variable only once), e.g. at synthetic data written by
``aff_seg.data.synthetic.make_synthetic_datasets`` after detectron2 was imported.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import builtin as d2_builtin
from detectron2.data.datasets import register_lvis_instances
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from detectron2.data.datasets.lvis import get_lvis_instances_meta

__all__ = [
    "ADE20K_SEM_SEG_COLORS",
    "check_dataset_exists",
    "datasets_root",
    "register_project_datasets",
    "register_standard_datasets",
]

# fmt: off
#: the standard ADE20K palette, one RGB colour per class of ADE20K_SEM_SEG_CATEGORIES
ADE20K_SEM_SEG_COLORS = [
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
    [120, 120, 80], [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7],
    [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51],
    [255, 6, 82], [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
    [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255], [255, 7, 71],
    [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10],
    [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
    [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153], [6, 51, 255],
    [235, 12, 255], [160, 150, 20], [0, 163, 255], [140, 140, 140], [250, 10, 15],
    [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0],
    [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112],
    [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0],
    [0, 143, 255], [51, 255, 0], [0, 82, 255], [0, 255, 41], [0, 255, 173],
    [10, 0, 255], [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
    [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20], [255, 184, 184],
    [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255],
    [0, 122, 255], [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
    [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0], [8, 184, 170],
    [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255],
    [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255], [112, 224, 255],
    [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235],
    [245, 0, 255], [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0],
    [0, 204, 255], [20, 0, 255], [255, 255, 0], [0, 153, 255], [0, 41, 255],
    [0, 255, 204], [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
    [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255], [184, 255, 0],
    [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
]
# fmt: on

_ADE20K_NAMES = ("ade20k_sem_seg_train", "ade20k_sem_seg_val")
_LVIS_COCOFIED = {"lvis_v1_val_cocofied": ("coco/", "lvis/lvis_v1_val_cocofied.json")}
_COCO_PANOPTIC_SEM_SEG = {  # panoptic name -> its semantic labels, as Mask2Former lays them out
    "coco_2017_train_panoptic": "coco/panoptic_semseg_train2017",
    "coco_2017_val_panoptic": "coco/panoptic_semseg_val2017",
}
_PROJECT_NAMES = tuple(_LVIS_COCOFIED) + tuple(n + "_with_sem_seg" for n in _COCO_PANOPTIC_SEM_SEG)

# detectron2's own registration functions for the datasets this project uses
_D2_REGISTRATIONS = (
    d2_builtin.register_all_coco,
    d2_builtin.register_all_lvis,
    d2_builtin.register_all_cityscapes,
    d2_builtin.register_all_cityscapes_panoptic,
    d2_builtin.register_all_ade20k,
)

# name prefix -> (how to make the real data, ``make_synthetic_datasets`` dataset or None)
_HOW_TO_CREATE = {
    "ade20k_": ("download ADEChallengeData2016 and run tools/datasets/prepare_ade20k_sem_seg.py",
                "ade20k"),
    "coco_": ("download COCO 2017 images with the instances and panoptic annotations, then run "
              "tools/datasets/prepare_coco_semantic_annos_from_panoptic_annos.py for "
              "panoptic_semseg_*", "coco"),
    "cityscapes_": ("download leftImg8bit and gtFine, then run tools/datasets/prepare_cityscapes.py "
                    "(cityscapesscripts' own converters)", "cityscapes"),
    "lvis_": ("download the LVIS json files (and COCO images); for lvis_v1_val_cocofied run "
              "tools/datasets/prepare_cocofied_lvisv1.py", None),
}
# the folders the standard datasets occupy directly under the root
_TOP_FOLDERS = ("ADEChallengeData2016", "coco", "cityscapes", "lvis")
# metadata keys that hold a dataset's input paths
_PATH_KEYS = ("image_root", "image_dir", "gt_dir", "json_file", "sem_seg_root", "panoptic_root",
              "panoptic_json")


def datasets_root():
    """The root detectron2 reads the standard datasets from: ``$DETECTRON2_DATASETS``."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def _coco_panoptic_metadata():
    """Mask2Former's metadata for COCO panoptic with semantic labels: contiguous ids are
    indices into COCO_CATEGORIES; every category, thing or stuff, has a semantic id."""
    things = [c for c in COCO_CATEGORIES if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "stuff_classes": [c["name"] for c in COCO_CATEGORIES],
        "stuff_colors": [c["color"] for c in COCO_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(COCO_CATEGORIES) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)},
    }


def _load_coco_panoptic_with_sem_seg(panoptic_json, image_root, panoptic_root, sem_seg_root,
                                     metadata):
    records = load_coco_panoptic_json(panoptic_json, image_root, panoptic_root, metadata)
    for record in records:
        record["sem_seg_file_name"] = os.path.join(
            sem_seg_root, os.path.basename(record["pan_seg_file_name"]))
    return records


def _register_coco_panoptic_with_sem_seg(root):
    metadata = _coco_panoptic_metadata()
    for panoptic_name, sem_seg_dir in _COCO_PANOPTIC_SEM_SEG.items():
        panoptic = MetadataCatalog.get(panoptic_name)
        # detectron2 lists all 133 categories as thing_classes; Mask2Former keeps the 80 things
        for key in ("thing_classes", "thing_colors"):
            delattr(panoptic, key)
        panoptic.set(thing_classes=metadata["thing_classes"],
                     thing_colors=metadata["thing_colors"])

        name = panoptic_name + "_with_sem_seg"
        sem_seg_root = os.path.join(root, sem_seg_dir)
        DatasetCatalog.register(
            name,
            lambda p=panoptic, s=sem_seg_root: _load_coco_panoptic_with_sem_seg(
                p.panoptic_json, p.image_root, p.panoptic_root, s, metadata),
        )
        MetadataCatalog.get(name).set(
            sem_seg_root=sem_seg_root,
            panoptic_root=panoptic.panoptic_root,
            image_root=panoptic.image_root,
            panoptic_json=panoptic.panoptic_json,
            json_file=panoptic.json_file,
            evaluator_type="coco_panoptic_seg",
            ignore_label=255,
            label_divisor=1000,
            **metadata,
        )


def register_project_datasets(root):
    """Register this project's additions (module docstring) for datasets under ``root``.

    Expects detectron2's built-in names to be registered already.
    """
    for name in _ADE20K_NAMES:
        MetadataCatalog.get(name).set(stuff_colors=[list(c) for c in ADE20K_SEM_SEG_COLORS])
    for name, (image_root, json_file) in _LVIS_COCOFIED.items():
        register_lvis_instances(name, get_lvis_instances_meta("lvis_v1_cocofied"),
                                os.path.join(root, json_file), os.path.join(root, image_root))
    _register_coco_panoptic_with_sem_seg(root)


def _names_registered_by(register):
    """The dataset names ``register(root)`` registers, found by running it on empty catalogs
    (registration only records paths; nothing is read)."""
    saved = dict(DatasetCatalog), dict(MetadataCatalog)
    DatasetCatalog.clear()
    MetadataCatalog.clear()
    try:
        register("")
        return list(DatasetCatalog)
    finally:
        DatasetCatalog.clear()
        MetadataCatalog.clear()
        DatasetCatalog.update(saved[0])
        MetadataCatalog.update(saved[1])


def _how_to_create(name):
    for prefix, how in _HOW_TO_CREATE.items():
        if name.startswith(prefix):
            return how
    return None


def check_dataset_exists(name):
    """Raise ``FileNotFoundError`` naming the missing path, and how to create it, if a file or
    folder that the registered dataset ``name`` reads is missing (or a folder is empty).

    Standard names run this check themselves before loading.
    """
    if name not in DatasetCatalog:
        raise KeyError(f"dataset {name!r} is not registered; registered: "
                       f"{', '.join(sorted(DatasetCatalog.list()))}")
    metadata = MetadataCatalog.get(name)
    for key in _PATH_KEYS:
        path = getattr(metadata, key, None)
        if not isinstance(path, str) or "://" in path:
            continue
        if os.path.isdir(path) and os.listdir(path) or os.path.isfile(path):
            continue
        problem = "is empty" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(_missing_message(name, key, path, problem))


def _missing_message(name, key, path, problem):
    message = f"dataset {name!r}: its {key} {path} {problem}."
    how = _how_to_create(name)
    if how is None:
        return message
    real, synthetic = how
    # the root is what precedes the dataset's own top folder in the path
    parts = os.path.normpath(path).split(os.sep)
    tops = [i for i, part in enumerate(parts) if part in _TOP_FOLDERS]
    root = (os.sep.join(parts[: tops[0]]) or os.curdir) if tops else datasets_root()
    message += (f" The standard dataset names read from the root that $DETECTRON2_DATASETS names "
                f"when detectron2 is imported (now {datasets_root()!r}); this registration "
                f"expects {root!r}. To create the files there, {real}")
    if synthetic:
        message += (f"; or write a small synthetic copy: python tools/make_synthetic_datasets.py "
                    f"--root {root} --datasets {synthetic}")
    return message + "."


def _checked(name, load):
    def load_checked():
        check_dataset_exists(name)
        return load()

    load_checked.checks_paths = True
    return load_checked


def _add_path_checks():
    """Wrap the loader of every standard name so that it runs ``check_dataset_exists`` first."""
    for name in DatasetCatalog.list():
        load = DatasetCatalog[name]
        if _how_to_create(name) is None or getattr(load, "checks_paths", False):
            continue
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, _checked(name, load))


def register_standard_datasets(root):
    """(Re)register the standard COCO, LVIS, Cityscapes and ADE20K names and this project's
    additions for datasets under ``root``, replacing earlier registrations of those names.

    Use it when the datasets are not under the ``$DETECTRON2_DATASETS`` that was set when
    detectron2 was imported (tests, ``make demo``).  Metadata objects fetched before the call
    keep the old paths.
    """
    names = [n for register in _D2_REGISTRATIONS for n in _names_registered_by(register)]
    for name in names + list(_PROJECT_NAMES):
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    for register in _D2_REGISTRATIONS:
        register(root)
    register_project_datasets(root)
    _add_path_checks()


register_project_datasets(datasets_root())
_add_path_checks()
