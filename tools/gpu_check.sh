#!/usr/bin/env bash
# One-shot check on a machine with a CUDA GPU (see tools/gpu_check.py for the steps).
#
#   bash tools/gpu_check.sh              # on the GPU machine; report in $OUT (default gpu_check_out/)
#   bash tools/gpu_check.sh --dry-run    # every step at toy sizes on the CPU
#
# Python: $PYTHON if set, else .venv/bin/python if it exists; otherwise, if wheelhouse/ (make wheelhouse) is present,
# a venv on top of the machine's own torch is made in /tmp and the wheels are installed offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif [ -d wheelhouse ]; then
    python3 -m venv --system-site-packages /tmp/aff_seg_gpu_venv
    /tmp/aff_seg_gpu_venv/bin/python -m pip install -q --no-index --no-deps wheelhouse/*.whl
    PY=/tmp/aff_seg_gpu_venv/bin/python
else
    PY=python3
fi
exec "$PY" tools/gpu_check.py "$@"
