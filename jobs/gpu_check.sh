#!/usr/bin/env bash
# One command for a real GPU: qwenbatch on one H100 or H200, in at most 8 minutes of wall time.
#
# It builds a random-weight model with Qwen3-VL-8B-Instruct's exact shape directly on the GPU
# (bf16, no CPU initialisation) and saves it once, then on 1024x768 JPEGs with 128 new tokens runs
# the plain transformers loop (batch 4, 64 images), qwenbatch (384 images) and qwenbatch with
# generation.compile (384 images), and prints and writes images/s, output tokens/s, MFU, gpu_busy
# and peak GPU memory (bench.md, bench.json). docs/performance.md shows the sizing arithmetic.
# First, in at most HOST_S (100) seconds, the host time of a decode step on CUDA (`bench --mode host`:
# the tiny width at the 8B's 36 text layers, eager and compiled with CUDA graphs; host.md, host.json);
# the GPU benchmark gets what is left of the 8 minutes.
#
# On the lent, offline machine: pack here with jobs/gpu_pack.sh, then run, carrying .gpu:
#   source .gpu/setup.sh && jobs/gpu_check.sh
# The model (17.5 GB) and images go to QWENBATCH_GPU_CHECK_DIR (default /tmp/qwenbatch-gpu-check);
# the log and tables to $OUT when set, else there too. QWENBATCH_GPU_CHECK_SMOKE=1 runs the same
# steps with the tiny model, 4 small images, on whatever device there is: the test suite does, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${QWENBATCH_GPU_CHECK_DIR:-/tmp/qwenbatch-gpu-check}
out=${OUT:-$work}
mkdir -p "$work" "$out"
TOTAL_S=480
HOST_S=100
args=(--mode gpu --dir "$work")
host_args=(--mode host --dir "$work/host" --layers 36 --devices cuda)
if [ "${QWENBATCH_GPU_CHECK_SMOKE:-0}" = 1 ]; then
  args+=(--images 4 --max-pixels 65536 --tiny)
  host_args=(--mode host --dir "$work/host" --layers 1 --devices cpu)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
set -o pipefail
started=$(date +%s)
# Host figures are worth having but not the GPU benchmark's time: a timeout here is reported, not fatal.
timeout "$HOST_S" python3 -m qwenbatch.cli bench "${host_args[@]}" 2>&1 | tee "$out/gpu_check.log" \
  || echo "gpu_check: host bench did not finish (exit $?)" | tee -a "$out/gpu_check.log"
left=$(( TOTAL_S - ($(date +%s) - started) ))
timeout "$left" python3 -m qwenbatch.cli bench "${args[@]}" 2>&1 | tee -a "$out/gpu_check.log"
echo "gpu_check: $(( $(date +%s) - started )) s" | tee -a "$out/gpu_check.log"
[ ! -f "$work/host/bench.md" ] || cp "$work/host/bench.json" "$out/host.json"
[ ! -f "$work/host/bench.md" ] || cp "$work/host/bench.md" "$out/host.md"
[ "$out" = "$work" ] || cp "$work/bench.json" "$work/bench.md" "$out/"
