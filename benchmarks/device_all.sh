#!/usr/bin/env bash
# Every GPU check of benchmarks/ in one prepared run for a lent GPU (at most 590 s of step limits; the steps in order of need).
#
#     OUT=out bash benchmarks/device_all.sh      # out/logs.tgz: one log per step, and profiles
#
# Each step has its own time limit and log, so a failing or slow step leaves the others' numbers.
# The logs are written to $LOGS (default /tmp/device-logs) and packed into $OUT/logs.tgz after
# every step, so a run cut short still returns the steps before, as one file.
# Expects a Python with torch (CUDA), lightning, torchmetrics, tifffile, scipy, matplotlib and
# typer; kornia may come as wheels in .whl/ (installed to /tmp/site when present).
set -u
OUT=${OUT:-device-logs}
LOGS=${LOGS:-/tmp/device-logs}
mkdir -p "$OUT" "$LOGS"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/00-gpu.txt"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.txt" 2>&1
  local rc=$?
  tail -n 40 "$LOGS/$name.txt"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOGS/$name.txt"
  tar -czf "$OUT/logs.tgz.part" -C "$LOGS" . && mv "$OUT/logs.tgz.part" "$OUT/logs.tgz"
}
step 10-unet-step-b4 50 python3 benchmarks/unet_step.py --batch 4 --steps 30 --profile "$LOGS/10-profile-b4.txt"
step 11-unet-step-b16 50 python3 benchmarks/unet_step.py --batch 16 --steps 30
step 13-unet-step-b4-compiled 100 python3 benchmarks/unet_step.py --batch 4 --steps 20 --compile reduce-overhead \
  --families p4 p4m --train-only
step 20-device-check 110 python3 benchmarks/device_check.py --parts norm placement speed
step 21-device-train 150 python3 benchmarks/device_check.py --parts train
step 40-inference 90 python3 benchmarks/inference.py --device cuda --sizes 512 1024 --repeats 5 --modes eager optimized
step 30-gpu 40 python3 benchmarks/gpu.py
