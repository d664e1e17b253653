#!/usr/bin/env bash
# One device call (session 28): `pi0-policy demo` with config/demo_cuda.yaml (full-size pi0.5, random
# weights, ALOHA: 3 JPEG cameras of 120x160, 14 joints, H = 50) on the GPU machine, the package before
# the tick's host-side cuts (BASE: a git archive of 064af9d in .carry/base064) against this checkout,
# alternating base / new twice, at 30 Hz (held: latency) and at 200 Hz (the ceiling, to a 5 ms timer
# period; at 100 Hz a tick of 20-30 ms always reads 33.3 Hz), 20 s each.
# Usage (device, repo root; run carry [".whl", ".carry/base064"]):
#   RUN=191 COMMIT=<full sha> OUT=$OUT bash bench/node_ab_device.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
RUN=${RUN:?set RUN}
COMMIT=${COMMIT:?set COMMIT}
BASE=${BASE:-.carry/base064}
mkdir -p "$OUT"
echo "commit $COMMIT, base $BASE"
source bench/ros_device_env.sh || exit 1
for hz in 30 200; do
  sed "s/^\(    control_rate_hz:\).*/\1 $hz.0/" config/demo_cuda.yaml > "/tmp/demo_cuda_${hz}hz.yaml"
done
for round in 1 2; do
  for side in base new; do
    root=$PWD; [ "$side" = base ] && root=$PWD/$BASE
    for hz in 30 200; do
      log="$OUT/demo_ab_run${RUN}_${side}${round}_${hz}hz.log"
      PYTHONPATH=$root:$PYTHONPATH timeout 120 python3 -m pi0_policy_ros.cli demo \
        --params "/tmp/demo_cuda_${hz}hz.yaml" --duration 20 > "$log" 2>&1
      echo "$side round $round $hz Hz rc=$?: $(grep -E 'chunks in' "$log" | tail -1)"
    done
  done
done
tar -czf "$OUT/demo_ab_run${RUN}_logs.tgz" -C "$OUT" $(cd "$OUT" && ls demo_ab_run${RUN}_*.log) && rm "$OUT"/demo_ab_run${RUN}_*.log
