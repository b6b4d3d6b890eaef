"""Make the pb1-detectron2 0.6 sdist installable: it ships no C++/CUDA sources.

Usage: python tools/patch_detectron2_setup.py path/to/setup.py

Rewrites the ``ext_modules=get_extensions()`` argument of its ``setup()`` call to
``ext_modules=[]``.  The pure-Python detectron2 then installs; ``detectron2._C`` is
provided as a stub by ``aff_seg.compat``.
"""
import sys

path = sys.argv[1]
text = open(path).read()
needle = "ext_modules=get_extensions(),"
if needle not in text:
    sys.exit(f"{path}: expected '{needle}' in detectron2's setup.py; sdist layout changed?")
open(path, "w").write(text.replace(needle, "ext_modules=[],"))
print(f"patched {path}: ext_modules=[]")
