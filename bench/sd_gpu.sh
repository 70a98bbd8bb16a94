#!/usr/bin/env bash
# The GPU part of bench/sd.py, as one command for a machine with python3, torch and CUDA but no diffusers
# (the device tool's H200 image): diffusers and clip-anytorch travel as wheels in .whl/ (bench/README.md).
# Writes $OUT/sd.json: bench/results/sd.json with its `gpu` object filled.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
OUT=${OUT:-/tmp/sd-bench-out}
mkdir -p "$OUT"
cp bench/results/sd.json "$OUT/sd.json" 2>/dev/null || true
python3 bench/sd.py --gpu --steps "${STEPS:-200}" --short-steps "${SHORT_STEPS:-50}" --work /tmp/sd-bench \
  --out "$OUT/sd.json" "$@" 2>&1 | tee "$OUT/sd-gpu.log"
