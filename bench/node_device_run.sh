#!/usr/bin/env bash
# One device call (session 28): the node on the GPU machine after the tick's host-side cuts.
# 1. `pi0-policy demo` with config/demo_cuda.yaml (full-size pi0.5, random weights, ALOHA: 3 JPEG
#    cameras of 120x160, 14 joints, H = 50) at 30 and at 100 Hz (the rate changed with sed), 20 s
#    each: the achieved rate, its ceiling, and observation stamp to trajectory received;
# 2. bench/tick_overhead.py on this machine's CPU (no GPU), 3 cameras of 640x480, alternating with
#    BASE, the package before the cuts (a git archive of 064af9d in .carry/base064).
# Usage (device, repo root; run carry [".whl", ".carry/base064"]):
#   RUN=190 COMMIT=<full sha> OUT=$OUT bash bench/node_device_run.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
RUN=${RUN:?set RUN}
COMMIT=${COMMIT:?set COMMIT}
BASE=${BASE:-.carry/base064}
mkdir -p "$OUT"
echo "commit $COMMIT, base $BASE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
source bench/ros_device_env.sh || exit 1
for hz in 30 100; do
  sed "s/^\(    control_rate_hz:\).*/\1 $hz.0/" config/demo_cuda.yaml > "/tmp/demo_cuda_${hz}hz.yaml"
  grep -n "control_rate_hz" "/tmp/demo_cuda_${hz}hz.yaml"
  timeout 170 python3 -m pi0_policy_ros.cli demo --params "/tmp/demo_cuda_${hz}hz.yaml" --duration 20 \
    > "$OUT/demo_run${RUN}_${hz}hz.log" 2>&1
  echo "rc=$? ($hz Hz)"; grep -v "^\[INFO\]" "$OUT/demo_run${RUN}_${hz}hz.log" | tail -12
done
timeout 200 python3 bench/tick_overhead.py --compare "$BASE" --rounds 2 --ticks 100 \
  --cases 'raw/*/naive' 'jpeg/*/naive' --json "$OUT/tick_overhead_run${RUN}.json" 2>&1 \
  | tail -14 | tee "$OUT/tick_overhead_run${RUN}.log"
