#!/usr/bin/env bash
# Every GPU row of docs/BENCHMARKS.md in one run (about 13 minutes on an H200):
#   1. the fleet against the bare pipeline, eager, at max batch 8 and max batch 1;
#   2. a compiled fleet (reduce-overhead, warmed at batch 1 and 8) against the eager bare
#      pipeline: images/s at max batch 8, a lone job's end-to-end p50, and the worker's start
#      with an empty and with a filled compile cache;
#   3. step-level against request-level batching, eager: saturation, Poisson loads at 30/50/80%
#      and mixed 10/40 steps, beside the queueing model (about 6 more minutes).
# An SD-1.5-shaped pipeline with random weights (fleet model init --arch sd15), fp16, 512x512,
# 20 steps. Results go to $OUT (default results/) as they are measured.
#
# On an offline GPU host, from the checkout's root (see ../shared/gpu/README.md):
#   bash .gpu/install.sh && bash docs/bench/gpu.sh
# Smaller, on a CPU, to rehearse it:
#   ARCH=tiny SIZE=64 JOBS=16 STEP_JOBS=20 DEVICE=cpu bash docs/bench/gpu.sh
set -euo pipefail
OUT=${OUT:-results}
ARCH=${ARCH:-sd15}
SIZE=${SIZE:-512}
STEPS=${STEPS:-20}
JOBS=${JOBS:-64}
DEVICE=${DEVICE:-auto}
COMPILE=${COMPILE:-reduce-overhead}
MODEL=${MODEL:-/tmp/fleet-$ARCH}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Every fleet's process logs (the worker's has the engine's load, warm-up and compile times),
# packed into one file at the end.
export FLEET_BENCH_LOGS="$OUT/fleet-logs"
trap 'tar czf "$OUT/fleet-logs.tgz" -C "$OUT" fleet-logs 2>/dev/null && rm -rf "$FLEET_BENCH_LOGS"' EXIT
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} | tee "$OUT/gpu-host.txt"
[ -f "$MODEL/model_index.json" ] || fleet model init "$MODEL" --arch "$ARCH"
fleet bench batching --size "$SIZE" --steps "$STEPS" --jobs "$JOBS" --device "$DEVICE" --model "$MODEL" \
  --closed-loop --config 8:0:fixed --config 1:0:fixed --compile "$COMPILE" \
  --out "$OUT/gpu-batching-$SIZE.json" 2>&1 | tee "$OUT/gpu-batching-$SIZE.log"
# 3. Step-level against request-level batching (BENCHMARKS.md section 13), eager.
fleet bench steps --setups model --model "$MODEL" --size "$SIZE" --steps "$STEPS" --device "$DEVICE" \
  --jobs "${STEP_JOBS:-100}" --out "$OUT/gpu-steps" 2>&1 | tee "$OUT/gpu-steps.log"
