"""Each detectron2 v0.6 compatibility fix: the failure it prevents, and that it prevents it.

Every case runs in a fresh interpreter that loads ``aff_seg/compat.py`` by path (so that
importing ``aff_seg`` does not apply all fixes first), applies every fix *except* the one under
test, checks that detectron2 fails the way the fix is for, then applies the fix and checks
that the same call works with all of them applied (``apply()``).
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMPAT = Path(__file__).resolve().parents[2] / "aff_seg" / "compat.py"

PRELUDE = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("compat_under_test", {str(COMPAT)!r})
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
"""

CASES = {
    # fix name -> (code that needs the fix, error expected without it)
    "_fix_pillow": ("import detectron2.data.transforms", "LINEAR"),
    "_fix_numpy": (
        "from detectron2.data.build import print_instances_class_histogram\n"
        "print_instances_class_histogram([{'annotations': [{'category_id': 0}]}], ['a'])",
        "has no attribute 'int'",
    ),
    "_fix_detectron2_c": ("import detectron2.layers", "cannot import name '_C'"),
    "_fix_cityscapesscripts_json": (
        "import os, tempfile, numpy as np\n"
        "from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as e\n"
        "e.writeDict2JSON({'pixelCount': np.int64(3)}, os.path.join(tempfile.mkdtemp(), 'm.json'))",
        "has no attribute '__dict__'",
    ),
    "_fix_detectron2_export": (
        "from detectron2.utils.analysis import FlopCountAnalysis\nfrom detectron2.export import TracingAdapter",
        "No module named 'caffe2'",
    ),
    "_fix_cityscapes_panoptic_paths": (
        # one Cityscapes panoptic image under a dataset root with a dot in its path
        "import json, os, tempfile, numpy as np\n"
        "from PIL import Image\n"
        "root = tempfile.mkdtemp(prefix='j.doe.')\n"
        "stem = 'lindau_000000_000019'\n"
        "for rel in (f'leftImg8bit/val/lindau/{stem}_leftImg8bit.png',\n"
        "            f'gtFine/val/lindau/{stem}_gtFine_labelTrainIds.png',\n"
        "            f'gtFine/cityscapes_panoptic_val/{stem}_gtFine_panoptic.png'):\n"
        "    path = os.path.join(root, 'cityscapes', rel)\n"
        "    os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)\n"
        "info = {'annotations': [{'image_id': stem, 'file_name': f'{stem}_gtFine_panoptic.png',\n"
        "                         'segments_info': [{'id': 7, 'category_id': 7}]}]}\n"
        "with open(os.path.join(root, 'cityscapes/gtFine/cityscapes_panoptic_val.json'), 'w') as f:\n"
        "    json.dump(info, f)\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "from detectron2.data.datasets.cityscapes_panoptic import register_all_cityscapes_panoptic\n"
        "for name in ('cityscapes_fine_panoptic_train', 'cityscapes_fine_panoptic_val'):\n"
        "    DatasetCatalog.remove(name)\n"
        "    MetadataCatalog.remove(name)\n"
        "register_all_cityscapes_panoptic(root)\n"
        "record, = DatasetCatalog.get('cityscapes_fine_panoptic_val')\n"
        "assert record['sem_seg_file_name'] == os.path.join(\n"
        "    root, f'cityscapes/gtFine/val/lindau/{stem}_gtFine_labelTrainIds.png')\n"
        "assert record['segments_info'][0]['category_id'] == 0  # road: train id 0",
        "Please generate labelTrainIds.png",
    ),
}


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fix", sorted(CASES))
def test_fix_is_needed_and_works(fix):
    needs_fix, expected_error = CASES[fix]
    others = "\n".join(f"compat.{name}()" for name in CASES if name != fix)  # in apply()'s order
    without = _run(PRELUDE + others + "\n" + needs_fix)
    assert without.returncode != 0, f"{fix}: detectron2 worked without it; is the fix still needed?"
    assert expected_error in without.stderr, without.stderr[-2000:]

    with_fix = _run(PRELUDE + "compat.apply()\n" + needs_fix + "\nprint('OK')")
    assert with_fix.returncode == 0, with_fix.stderr[-2000:]
    assert with_fix.stdout.strip().endswith("OK")


def test_missing_extension_fails_clearly_when_called():
    code = PRELUDE + textwrap.dedent(
        """
        compat.apply()
        import detectron2._C as C
        try:
            C.nms_rotated(None, None, 0.5)
        except RuntimeError as e:
            print(str(e))
        """
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "detectron2._C.nms_rotated is unavailable" in out.stdout
    assert "use_fast_impl=False" in out.stdout


def test_importing_aff_seg_applies_every_fix_before_detectron2():
    code = (
        "import aff_seg, numpy as np, PIL.Image\n"
        "import detectron2.layers, detectron2.data.transforms, detectron2.model_zoo\n"
        "assert np.int is int and PIL.Image.LINEAR == PIL.Image.BILINEAR\n"
        "print('OK')"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]


def test_in1d_for_cityscapesscripts():
    """numpy 2.4 removed ``np.in1d``; cityscapesscripts' instance evaluation calls it."""
    probe = "import numpy as np\nprint(np.in1d(np.array([[1, 2], [3, 4]]), [2, 3]).tolist())"
    without = _run(probe)
    assert without.returncode != 0 and "in1d" in without.stderr
    with_fix = _run(PRELUDE + "compat.apply()\n" + probe)
    assert with_fix.returncode == 0, with_fix.stderr[-2000:]
    assert with_fix.stdout.strip() == "[False, True, True, False]"
