"""Loading AFF weights without executing code from the file, and the classification checkpoints.

* ``load_weights_file``: ``.pth``/``.pt`` through ``torch.load(weights_only=True)`` (numpy arrays
  allowed: the official classification checkpoints store numpy's RNG state); ``.pkl`` through a
  restricted unpickler that accepts tensors, numpy arrays and plain containers only (the
  converter's output and detectron2's model-zoo files).
* ``AFFCheckpointer``: a ``DetectionCheckpointer`` that reads files that way and recognises an
  official ImageNet classification checkpoint (keys without prefix, plus ``head.*``/``norm.*``):
  its backbone tensors are mapped onto the model's backbone by name, the classifier is dropped,
  and one log line says what was mapped and what was dropped. detectron2's own report then
  lists whatever the model still misses (the output norms ``norm0..3`` and the heads).
  An official Focal Transformer classification checkpoint (bare or under ``model``) is mapped
  the same way onto the model's ``FocalTransformer`` module, by name, with its own report of
  the new keys and of any key whose shape differs.
  It writes checkpoints atomically (temporary file, then rename), and ``--resume`` falls back,
  with a warning, to the newest complete checkpoint when the last one is truncated or corrupted.

  It also reads SegFormer and BoostFormer checkpoints as their users have them (``segformer_weights``):
  NVlabs (mmseg 0.x) and MMSegmentation (>= 0.17) ``.pth`` files, the ImageNet ``mit_b*.pth`` encoders, and
  HuggingFace ``save_pretrained`` output (the directory, or its ``pytorch_model.bin`` / ``model.safetensors``;
  ``config.json`` beside it is named in the report). They are renamed to the project's modules and then checked like any file; an
  encoder alone (ImageNet MiT) must in strict mode also provide every tensor of the model's encoder.
Loading is strict (``check_load``): missing, unexpected or shape-mismatched keys stop the load
with a table of them (``CheckpointMismatchError``), unless the checkpointer was made with
``strict=False`` (``MODEL.WEIGHTS_STRICT False``) or the file is a classification checkpoint
(backbone pre-training: keys the segmentation model adds stay randomly initialised, and the
table of them is logged). Resuming a training run (model plus trainer state) is always strict.
Checkpoints saved by ``AFFCheckpointer`` carry a SHA-256 of their model tensors
(``tensor_checksum``), verified when they are read.
"""
import glob
import hashlib
import io
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from tabulate import tabulate

from .modeling.backbone import segformer_weights
from .modeling.backbone.focal import FocalTransformer, focal_classification_state_dict

__all__ = [
    "AFFCheckpointer",
    "CheckpointMismatchError",
    "HF_WEIGHT_FILES",
    "LoadReport",
    "check_load",
    "check_weights",
    "load_weights_file",
    "split_classification_checkpoint",
    "tensor_checksum",
]

logger = logging.getLogger(__name__)

CLASSIFIER_PREFIXES = ("head.", "norm.")  # the classification model's final norm and classifier
STEM_KEY = "patch_embed.proj1.weight"
CHECKSUM_KEY = "tensor_checksum"
FORMATS_AUTHOR = "SegFormer/BoostFormer conversion"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes, in preference order


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model, or whose tensors fail their checksum."""


def tensor_checksum(state_dict):
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``state_dict``'s tensors."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class LoadReport:
    """What loading ``source`` into a model matched.

    Attributes:
        missing: model keys the file lacks (they keep their initial values).
        unexpected: file keys the model does not have.
        mismatched: ``(key, shape in the file, shape in the model)``; not loaded.
        loaded: number of model keys loaded from the file.
        classification: the file holds backbone weights only (a classification checkpoint,
            as used for backbone pre-training).
    """

    source: str
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    loaded: int = 0
    classification: bool = False

    @property
    def clean(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def table(self):
        rows = [(k, "missing in the file (left at its initial value)", "", "") for k in self.missing]
        rows += [(k, "not in the model (ignored)", "", "") for k in self.unexpected]
        rows += [(k, "shape differs (not loaded)", str(f), str(m)) for k, f, m in self.mismatched]
        return tabulate(rows, headers=["key", "problem", "shape in file", "shape in model"], tablefmt="pipe")


def check_load(report, allow_partial):
    """Raise ``CheckpointMismatchError`` with the report's table unless the load is clean, or
    ``allow_partial`` holds (the table is then logged as a warning). Missing and unexpected keys
    of a classification checkpoint are expected and logged; a file of which no key fits the
    model is refused either way."""
    if report.clean:
        return
    summary = (f"{report.source}: {report.loaded} tensors loaded, {len(report.missing)} missing, "
               f"{len(report.unexpected)} unexpected, {len(report.mismatched)} of another shape")
    if report.loaded == 0:
        raise CheckpointMismatchError(f"{summary}: no key of the file fits the model\n{report.table()}")
    if allow_partial or (report.classification and not report.mismatched):
        logger.warning(f"{summary}; the model keeps its initial values for what was not loaded:\n{report.table()}")
        return
    raise CheckpointMismatchError(
        f"{summary}: the file does not fit the model (another architecture or size?)\n{report.table()}\n"
        "Set MODEL.WEIGHTS_STRICT False to load what matches and leave the rest as initialised."
    )


def _numpy_globals():
    core = getattr(np, "_core", None) or np.core
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by class
    dtype_classes = [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")] if dtypes else []
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype] + dtype_classes


def _load_tensor_bytes(data):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for weight files: tensors, numpy arrays and containers; anything else is refused."""

    def find_class(self, module, name):
        allowed = {
            ("collections", "OrderedDict"): __import__("collections").OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): _load_tensor_bytes,
            ("torch", "Size"): torch.Size,
        }
        for obj in _numpy_globals():
            allowed[(obj.__module__, obj.__name__)] = obj
            allowed[(obj.__module__.replace("numpy._core", "numpy.core"), obj.__name__)] = obj
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a weights file may only hold tensors, numpy arrays "
                "and plain containers"
            )
        return allowed[(module, name)]


def load_weights_file(filename):
    """Read a checkpoint file (local path or detectron2 PathManager URL) without running its code.

    Returns:
        The unpickled object (usually a dict); ``.pkl`` files are read with latin1 encoding,
        as detectron2 does.
    """
    if filename.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(PathManager.get_local_path(filename), device="cpu")
    with PathManager.open(filename, "rb") as f:
        if filename.endswith(".pkl"):
            return _RestrictedUnpickler(f, encoding="latin1").load()
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(f, map_location="cpu", weights_only=True)


def split_classification_checkpoint(state_dict):
    """Backbone and classifier tensors of an official AFF classification state_dict.

    Returns:
        ``(backbone, dropped)``: the state_dict without the classifier, and the dropped key names;
        ``(None, [])`` if ``state_dict`` is not a classification checkpoint (no un-prefixed stem).
    """
    if STEM_KEY not in state_dict:
        return None, []
    dropped = sorted(k for k in state_dict if k.startswith(CLASSIFIER_PREFIXES))
    return {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIXES)}, dropped


def check_weights(path):
    """Raise ``FileNotFoundError`` naming ``path`` when it is a local weights file that is
    missing.  An empty path (random initialisation) and URLs (``https://``,
    ``detectron2://`` ...) are left to detectron2's checkpointer."""
    if path and "://" not in path and not os.path.isfile(path) and not os.path.isdir(path):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS: weights file not found: {path}. Download it (MODEL_ZOO.md lists the "
            "published ones), give its URL, or set MODEL.WEIGHTS \"\" to start from random weights"
        )


class AFFCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with code-free loading, classification checkpoints, strict
    loading (see the module doc) and tensor checksums.

    Use it wherever detectron2's checkpointer loads ``MODEL.WEIGHTS`` (trainer, predictor, tools),
    with ``strict=cfg.MODEL.WEIGHTS_STRICT``.
    """

    def __init__(self, model, save_dir="", *, strict=True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self._restoring = ()

    def load(self, path, checkpointables=None):
        if path and os.path.isdir(path):  # a HuggingFace save_pretrained directory
            found = [os.path.join(path, name) for name in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
            if not found:
                raise FileNotFoundError(f"{path}: a directory without {' or '.join(HF_WEIGHT_FILES)}")
            path = found[0]
        self._restoring = tuple(self.checkpointables if checkpointables is None else checkpointables)
        return super().load(path, checkpointables)

    def _load_model(self, checkpoint):
        source = checkpoint.pop("__source__", "the checkpoint")
        resuming = [k for k in self._restoring if k in checkpoint]
        model_keys = list(self.model.state_dict())
        incompatible = super()._load_model(checkpoint)
        mismatched = [(k, tuple(f), tuple(m)) for k, f, m in incompatible.incorrect_shapes]
        missing = [k for k in incompatible.missing_keys if k not in {m[0] for m in mismatched}]
        # BatchNorm never reports its num_batches_tracked missing: not counted as loaded
        loaded = {k for k in model_keys if not k.endswith("num_batches_tracked")} - set(incompatible.missing_keys)
        # backbone pre-training (a classification checkpoint): it fits the backbone only
        classification = bool(loaded) and hasattr(self.model, "backbone") and all(
            k.startswith("backbone.") for k in loaded)
        report = LoadReport(source, missing, list(incompatible.unexpected_keys), mismatched,
                            loaded=len(loaded), classification=classification)
        if resuming and not report.clean:
            raise CheckpointMismatchError(
                f"cannot resume from {source}: its model does not fit this model, so its "
                f"{', '.join(resuming)} state cannot either (another config?)\n{report.table()}")
        check_load(report, allow_partial=not self.strict)
        return None  # reported above (detectron2 would log the keys a second time)

    def _load_file(self, filename):
        loaded = self._read_file(filename)
        loaded["__source__"] = filename
        return loaded

    def _read_file(self, filename):
        if not filename.endswith((".pth", ".pt", ".pkl", ".bin", ".safetensors")):
            return super()._load_file(filename)
        loaded = load_weights_file(filename)
        state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded  # mmseg: "state_dict"
        fmt = segformer_weights.detect_format(state_dict) if isinstance(state_dict, dict) else None
        if fmt is not None:
            return self._converted_segformer(filename, state_dict, fmt)
        if filename.endswith(".pkl") and not ("model" in loaded and "__author__" in loaded):
            raise ValueError(f"{filename}: not a detectron2-format .pkl (needs 'model' and '__author__')")
        if not isinstance(loaded, dict) or "model" not in loaded:
            loaded = {"model": loaded}
        if CHECKSUM_KEY in loaded and tensor_checksum(loaded["model"]) != loaded.pop(CHECKSUM_KEY):
            raise CheckpointMismatchError(
                f"{filename}: the tensors do not match the checksum saved with them; the file is corrupted")
        focal, dropped = focal_classification_state_dict(loaded["model"])
        if focal is not None:
            return self._focal_checkpoint(filename, focal, dropped)
        backbone, dropped = split_classification_checkpoint(loaded["model"])
        if backbone is None:
            return loaded
        prefix = self._backbone_prefix()
        logger.info(
            f"{filename}: AFF classification checkpoint; {len(backbone)} backbone tensors mapped to "
            f"'{prefix}*', classifier dropped: {', '.join(dropped) or 'none'}"
        )
        return {"model": {prefix + k: v for k, v in backbone.items()}, "__author__": "AFF classification"}

    def _converted_segformer(self, filename, state_dict, fmt):
        converted, dropped = segformer_weights.convert(state_dict, fmt)
        what = f"{filename}: {segformer_weights.FORMATS[fmt]} ({segformer_weights.describe(converted)})"
        config = os.path.join(os.path.dirname(filename), "config.json")
        if fmt.startswith("hf_") and os.path.isfile(config):
            with open(config) as f:
                hf = json.load(f)
            what += f", config.json: {hf.get('architectures')} hidden_sizes {hf.get('hidden_sizes')} depths {hf.get('depths')}"
        logger.info(f"{what}; {len(converted)} tensors renamed; dropped by design: {', '.join(dropped) or 'none'}")
        if self.strict and not any(k.startswith("sem_seg_head.") for k in converted):
            # an encoder alone passes check_load as backbone pre-training even when it is a shallower
            # encoder of the same widths: every tensor of the model's encoder must come from it
            lacking = sorted(k for k in self.model.state_dict() if k.startswith("backbone.")
                             and k not in converted and not k.endswith("num_batches_tracked"))
            if lacking:
                raise CheckpointMismatchError(
                    f"{what} lacks tensors of the model's encoder (another size?): {', '.join(lacking)}. "
                    "Set MODEL.WEIGHTS_STRICT False to load what matches and leave the rest as initialised.")
        return {"model": converted, "__author__": FORMATS_AUTHOR}

    def _focal_checkpoint(self, filename, backbone, dropped):
        """The Focal tensors under the name of the model's ``FocalTransformer``, with a report of
        what the file adds, lacks and where the shapes differ (detectron2 skips those, with a warning)."""
        found = [(name, m) for name, m in self.model.named_modules() if isinstance(m, FocalTransformer)]
        if not found:
            raise ValueError(f"{filename}: a Focal Transformer classification checkpoint, but the model has no FocalTransformer")
        name, module = found[0]
        prefix = name + "." if name else ""
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        new = sorted(set(expected) - set(backbone))
        logger.info(
            f"{filename}: Focal Transformer classification checkpoint; {len(backbone)} tensors mapped to "
            f"'{prefix}*', classifier dropped: {', '.join(dropped) or 'none'}; new (not in the file): {', '.join(new) or 'none'}"
        )
        mismatched = [f"{k} {tuple(v.shape)} in the file, {expected[k]} in the model"
                      for k, v in sorted(backbone.items()) if k in expected and tuple(v.shape) != expected[k]]
        unused = sorted(set(backbone) - set(expected))
        if mismatched or unused:
            logger.warning(
                f"{filename}: does not fit the model's Focal Transformer (another size or setting?); "
                f"shapes differ (not loaded): {'; '.join(mismatched) or 'none'}; "
                f"not in the model (not loaded): {', '.join(unused) or 'none'}"
            )
        return {"model": {prefix + k: v for k, v in backbone.items()}, "__author__": "Focal-Transformer classification"}

    def _backbone_prefix(self):
        for key in self.model.state_dict():
            if key.endswith(STEM_KEY):
                return key[: -len(STEM_KEY)]
        raise ValueError(f"the model has no AFF backbone ('*{STEM_KEY}') to load a classification checkpoint into")

    # -- writing and resuming ------------------------------------------------------------------

    def save(self, name, **kwargs):
        """detectron2's ``save`` plus the model tensors' checksum (``tensor_checksum``), atomic:
        ``<name>.pth`` is written under a temporary name and renamed when complete, then
        ``last_checkpoint`` is replaced the same way; a run killed while saving leaves the
        previous checkpoint and ``last_checkpoint`` as they were."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data[CHECKSUM_KEY] = tensor_checksum(data["model"])
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _write_atomically(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(path, lambda f: f.write(last_filename_basename.encode()))

    def get_checkpoint_file(self):
        """The checkpoint ``--resume`` continues from: the one ``last_checkpoint`` names or, when
        that file is truncated or corrupted, the newest complete ``model_*.pth`` saved before it
        (with a warning).  Raises ``RuntimeError`` naming the file when there is none."""
        last = super().get_checkpoint_file()
        if _is_complete(last):
            return last
        earlier = [p for p in glob.glob(os.path.join(self.save_dir, "model_*.pth"))
                   if _iteration_of(p) < _iteration_of(last)]
        for candidate in sorted(earlier, key=_iteration_of, reverse=True):
            if _is_complete(candidate):
                logger.warning(f"checkpoint {last} is truncated or corrupted; resuming from {candidate} instead")
                return candidate
        raise RuntimeError(
            f"checkpoint {last} (named in {os.path.join(self.save_dir, 'last_checkpoint')}) is truncated or "
            f"corrupted, and no complete earlier model_*.pth is in {self.save_dir}: delete it to start over"
        )


def _write_atomically(path, write):
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``."""
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _is_complete(path):
    """Whether ``path`` is a whole checkpoint file: ``torch.save`` writes a zip archive, whose
    closing directory a truncated or overwritten file lacks."""
    return os.path.isfile(path) and zipfile.is_zipfile(path)


def _iteration_of(path):
    """``model_0000123.pth`` -> 123; ``model_final.pth`` (and other names) come after every number."""
    stem = os.path.splitext(os.path.basename(path))[0]
    number = stem[len("model_"):]
    return int(number) if stem.startswith("model_") and number.isdigit() else float("inf")
