#!/usr/bin/env bash
# Build (or refresh) the project's virtual environment at .venv/ from nothing.
#
#   bash tools/install.sh          # idempotent: a second run with the env present takes seconds
#
# What it installs, and why each step is the way it is: README "Install" and
# shared engineering notes.  torch/torchvision are the standard CUDA build, pinned with '==='
# (exact string) so pip never takes a local CPU-only wheel; everything else goes through
# requirements/constraints.txt so that nothing can move torch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
CONSTRAINTS="$ROOT/requirements/constraints.txt"
STAMP="$VENV/.aff_seg-installed"
# The stamp records a hash of every input of the install: change one and the install reruns.
want=$(cat tools/install.sh requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import aff_seg, clusten, detectron2" 2>/dev/null; then
    echo "[install] .venv is up to date"
    exit 0
fi

log() { echo "[install] $*"; }
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

log "torch===2.13.0 torchvision===0.28.0 (standard CUDA build; runs on CPU too)"
"${PIP[@]}" -c "$CONSTRAINTS" "torch===2.13.0" "torchvision===0.28.0"

log "dependencies (pinned by requirements/constraints.txt)"
"${PIP[@]}" -c "$CONSTRAINTS" -r requirements/base.txt -r requirements/test.txt

if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('detectron2')" 2>/dev/null; then
    log "detectron2 0.6 from the pb1-detectron2 sdist, without its C++ extension"
    src="$ROOT/build/detectron2-src"
    rm -rf "$src" && mkdir -p "$src"
    "$VENV/bin/python" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$src" "pb1-detectron2==0.6"
    tar -xzf "$src"/pb1*detectron2-0.6.tar.gz -C "$src"
    d2dir=$(find "$src" -maxdepth 1 -mindepth 1 -type d | head -n1)
    "$VENV/bin/python" tools/patch_detectron2_setup.py "$d2dir/setup.py"
    "${PIP[@]}" --no-build-isolation --no-deps "$d2dir"
fi

log "panopticapi-lite (no deps: it declares numpy<2 but works on numpy 2)"
"${PIP[@]}" --no-deps "panopticapi-lite==0.2.0"

log "lvis (no deps: it pins opencv-python, which would clash with opencv-python-headless; it imports cv2, matplotlib, numpy, pycocotools)"
"${PIP[@]}" --no-deps "lvis==0.5.3"

log "aff_seg + clusten (editable)"
"${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT"

"$VENV/bin/python" -c "import aff_seg, clusten, detectron2, torchvision" 
echo "$want" > "$STAMP"
log "done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
