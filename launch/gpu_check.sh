#!/usr/bin/env bash
# The GPU check from a bare GPU machine (make gpu-check OUT=folder), or its CPU dry run (DRY=1).
#   launch/gpu_check.sh OUT_FOLDER
# On the GPU machine: installs the wheels carried in .whl/ (make gpu-wheels made them), builds
# megalora._C with its CUDA kernels for sm_90 only, then runs `python -m megalora.bench
# gpu-check`, which writes OUT_FOLDER/summary.md, the CSVs and a log per step.
set -uo pipefail
OUT=${1:?usage: launch/gpu_check.sh OUT_FOLDER (DRY=1 for the CPU dry run)}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ "${DRY:-0}" = 1 ]; then
    exec "${PYTHON:-.venv/bin/python}" -m megalora.bench gpu-check --out "$OUT" --dry-run
fi
PY=${PYTHON:-python3}
start=$SECONDS
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu-check: no wheels in .whl/: run 'make gpu-wheels' on a machine with PyPI access and carry .whl" >&2
    exit 2
fi
echo "gpu-check: installing ${#wheels[@]} wheels into /tmp/megalora-site"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/megalora-site "${wheels[@]}" >"$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/megalora-site${PYTHONPATH:+:$PYTHONPATH}
echo "gpu-check: building megalora._C with CUDA (sm_90)"
# editable: the extension lands in megalora/, so the source tree is what every step imports
MEGALORA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
echo "gpu-check: install and build took $((SECONDS - start)) s" | tee "$OUT/setup.txt"
exec "$PY" -m megalora.bench gpu-check --out "$OUT"
