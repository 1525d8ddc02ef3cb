#!/usr/bin/env bash
# Every GPU check of benchmarks/ in one prepared run for a lent GPU (about 8-9 minutes on an H100; the steps in order of need).
#
#     OUT=logs bash benchmarks/device_all.sh      # logs under $OUT, one file per step
#
# Each step has its own time limit and log, so a failing or slow step leaves the others' numbers.
# Expects a Python with torch (CUDA), lightning, torchmetrics, tifffile, scipy, matplotlib and
# typer; kornia may come as wheels in .whl/ (installed to /tmp/site when present).
set -u
OUT=${OUT:-device-logs}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/00-gpu.txt"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.txt"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}
step 10-unet-step-b4 50 python3 benchmarks/unet_step.py --batch 4 --steps 30 --profile "$OUT/10-profile-b4.txt"
step 11-unet-step-b16 50 python3 benchmarks/unet_step.py --batch 16 --steps 30
step 13-unet-step-b4-compiled 120 python3 benchmarks/unet_step.py --batch 4 --steps 20 --compile reduce-overhead
step 20-device-check 180 python3 benchmarks/device_check.py
step 40-inference 90 python3 benchmarks/inference.py --device cuda --sizes 512 1024 --repeats 5 --modes eager optimized
step 30-gpu 40 python3 benchmarks/gpu.py
step 41-inference-compiled 45 python3 benchmarks/inference.py --device cuda --sizes 1024 --repeats 5 --families plain p4m --modes compiled
