"""aff_seg: AutoFocusFormer segmentation as a Detectron2 project.

Importing the package applies the detectron2 v0.6 compatibility fixes (``aff_seg.compat``)
before detectron2 is touched, then registers the models and datasets with detectron2's
registries.

``aff_seg.Predictor(config, weights)`` is the Python inference API (``aff_seg.predictor``;
imported on first use).
"""
from .compat import apply as _apply_compat_fixes

_apply_compat_fixes()  # must run before any detectron2 import

from .config import add_maskformer2_config, load_config
from . import data  # noqa: F401  (dataset registrations)
from . import modeling  # noqa: F401  (backbone / pixel decoder / decoder / meta-arch registrations)

__all__ = ["Predictor", "add_maskformer2_config", "load_config"]


def __getattr__(name):
    if name == "Predictor":  # detectron2.engine is heavy: imported only when asked for
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'aff_seg' has no attribute {name!r}")
