#!/usr/bin/env bash
# Every row of docs/BENCHMARKS.md, in one run on one machine (about 30 minutes on 2 cores).
# Run from the repository root after `make setup`, with nothing else using the CPU.
set -euo pipefail
B=.venv/bin/fleet
OUT=docs/bench

# 1. Batching: the fleet at saturation, max batch 8 and 1, each between two bare runs.
$B bench batching --size 128 --jobs 96 --out $OUT/batching-128.json | tee $OUT/batching-128.md
$B bench batching --size 64 --jobs 96 --out $OUT/batching-64.json | tee $OUT/batching-64.md

# 2. Latency-throughput sweep of batching configurations on the tiny model, 64x64.
$B bench sweep --mix reference-64 --config 1:0:fixed --config 8:0:fixed --config 8:50:fixed \
    --config 8:200:fixed --config 8:100:adaptive --rates 3,6,9,12 --saturation --jobs 90 \
    --title "tiny model, 64x64, 20 steps, CPU (2 cores)" --out $OUT/sweep-64

# 3. Fleet overhead at low load (end to end minus inference, max_wait_ms=0).
$B bench sweep --mix reference-64 --config 8:0:fixed --rates 0.5 --jobs 40 \
    --title "tiny model, 64x64, low load" --out $OUT/low-load-64

# 4. The reference workload at 50% of saturation, against the ideal zero-overhead batcher
#    on the batch-cost profile measured just before.
$B bench bare --size 128 --batch-sizes 1,2,4,8 --calls 8 --device cpu --out $OUT/bare-128.json | tee $OUT/bare-128.md
$B bench sweep --mix reference-128 --config 8:0:fixed --config 8:100:adaptive --rates 3.5 --jobs 300 \
    --title "tiny model, 128x128, 50% load" --out $OUT/half-load-128
$B bench plan --fit $OUT/bare-128.json --rate 3.5 --p95 100 | tee $OUT/half-load-128-ideal-bare.txt
$B bench plan --fit $OUT/half-load-128.json --rate 3.5 --p95 100 | tee $OUT/half-load-128-ideal-infleet.txt

# 5. Scale-out on the simulated A100 (the model spends no CPU): 1 and 4 workers at saturation.
$B bench sweep --model sim:profile=sd15-a100-512 --mix reference-64 --config 8:0:fixed:1 --config 8:0:fixed:4 \
    --saturation --jobs 160 --title "simulated SD 1.5 on A100, saturation" --out $OUT/scale-sim

# 6. The planner's recommendations, then measured (simulated tiny-cpu-64 profile).
$B bench plan --profile tiny-cpu-64 --rate 8 --p95 1.0 | tee $OUT/plan-case1-recommendation.txt
$B bench sweep --model sim:profile=tiny-cpu-64 --mix reference-64 --config 8:0:fixed:1 --rates 8 --jobs 400 \
    --out $OUT/plan-case1
$B bench plan --profile tiny-cpu-64 --rate 30 --p95 1.5 | tee $OUT/plan-case2-recommendation.txt
$B bench sweep --model sim:profile=tiny-cpu-64 --mix reference-64 --config 8:50:adaptive:3 --rates 30 --jobs 900 \
    --out $OUT/plan-case2

# 8. The engine process against the model thread (FLEET_ENGINE=thread, the earlier design),
#    on the reference workload and on the host-share simulated GPU (half of each call is
#    GIL-holding Python, as an eager pipeline launching kernels), closed loop at saturation.
$B bench batching --size 128 --steps 20 --jobs 96 --closed-loop --config 8:0:fixed --config 8:0:fixed:1:thread \
    --config 1:0:fixed --config 1:0:fixed:1:thread --out $OUT/engine-128.json
$B bench batching --model "sim:a=0.035,b=0.3,host=0.5" --size 64 --steps 20 --jobs 96 --closed-loop \
    --config 8:0:fixed --config 8:0:fixed:1:thread --config 1:0:fixed --config 1:0:fixed:1:thread \
    --out $OUT/hostshare-64.json

# 9. PNG compression level against encode time and size at 512x512.
.venv/bin/python docs/bench/png_levels.py

# 10. The CPU one status read costs, and the fleet against the bare pipeline at saturation
#     by how the clients follow their jobs (waiting, streaming, polling every 0.5 s and 25 ms):
#     at 64x64, then on the reference workload in one order and then the reverse.
$B bench reads --reads 2000 --out $OUT/reads.json
$B bench batching --size 64 --steps 20 --jobs 64 --closed-loop --config 8:0:fixed \
    --follow wait --follow poll:0.025 --follow poll:0.5 --out $OUT/follow-64.json
$B bench batching --size 128 --steps 20 --jobs 96 --closed-loop --config 8:0:fixed \
    --follow wait --follow stream --follow poll:0.5 --follow poll:0.025 --out $OUT/follow-128.json
$B bench batching --size 128 --steps 20 --jobs 96 --closed-loop --config 8:0:fixed \
    --follow poll:0.025 --follow poll:0.5 --follow stream --follow wait --out $OUT/follow-128-reversed.json

# GPU rows (section 7 of BENCHMARKS.md): on a GPU host, bash docs/bench/gpu.sh

# 11. Quality against throughput: each recipe (steps, scheduler, guidance, precision, int8
#     weights, the distilled 4-step model) on the digits model, 500 images, judged
#     (docs/QUALITY.md). The models ship; these two commands remake them (16 + 9 minutes).
# $B model train digits models/digits --force
# $B model distill digits models/digits-4step --force
$B bench quality --per-digit 50 --out $OUT/quality

# 12. Many models and adapters: the digits adapters judged, adapter switch, model swap and
#     cold start (fleet bench models); two models on a pool each against one pool that swaps
#     (fleet bench pools, simulated GPUs). The adapters ship; this remakes them (9 minutes).
# $B model lora digits models/digits-loras --force
$B bench models --out $OUT
$B bench pools --out $OUT/pools.json

# 13. Step-level against request-level batching: saturation, Poisson loads at 30/50/80% and
#     mixed 10/40 steps, each beside the queueing model, on four setups (about 25 minutes).
$B bench steps --out $OUT/steps
