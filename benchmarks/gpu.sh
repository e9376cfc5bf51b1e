#!/usr/bin/env bash
# The reconstruction benchmark on one GPU in under 10 minutes (benchmarks/gpu.py): every
# model trains at once for a fixed wall-clock budget, then is scored; writes
# reconstruction.gpu.json, reconstruction_curve.gpu.json (with their .md / .png), the merged
# scores, the models in float16 and gpu.log to $OUT (default benchmarks/results).
#
# For a machine with PyTorch and CUDA but not the project's other dependencies (and no
# network): their wheels in .whl/ are installed into /tmp/site first. Fetch them beforehand on
# a machine with pip, for the GPU machine's Python (here 3.12, x86-64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 sigpy==0.1.27 PyWavelets==1.9.0 \
#       jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
#       rpds-py==2026.9.1
# The demo cohort's slice store is made if absent, which needs nilearn; where that is missing,
# make it beforehand (python benchmarks/gpu.py prepare) and bring benchmarks/work/gpu/slices.h5.
#
#   bash benchmarks/gpu.sh                       # extra arguments go to gpu.py run
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ! python3 -c "import monai, sigpy, nibabel, pydicom, jsonschema" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv || true
python3 benchmarks/gpu.py run --overlay "${OVERLAY:-benchmarks/gpu.yaml}" \
    --workdir "${WORKDIR:-benchmarks/work/gpu}" --results "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
