#!/usr/bin/env bash
# Where the end-to-end p99 tail comes from (runs 142-143): the bf16 bench, 400 iterations, run
# alternately with Python's garbage collector on and off (run 142), then pinned to one core with
# taskset and free (run 143). Writes host_tails_*.json under $OUT; prints median / p99 per stage.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ARGS="--preset pi05 --cameras 3 --valid-cameras 2 --valid-tokens 24 --precision bfloat16 --no-fp32-reference --iterations 400"
NOGC=$(mktemp --suffix .py)
printf 'import gc, runpy, sys\ngc.disable()\nsys.argv = ["bench"] + sys.argv[1:]\nrunpy.run_module("pi0_policy_ros.engine.bench", run_name="__main__")\n' > "$NOGC"

summary() {
  python3 - "$1" <<'PY'
import json, sys
stages = json.load(open(sys.argv[1]))["precisions"]["bfloat16"]
stages = stages.get("timings_ms", stages)
print(sys.argv[1].rsplit("/", 1)[-1], {k: (round(v["median"], 3), round(v["p99"], 3)) for k, v in stages.items()
                                       if isinstance(v, dict) and "p99" in v})
PY
}

case "${1:-gc}" in
gc)  # run 142
  for i in 1 2; do
    python3 -m pi0_policy_ros.engine.bench $ARGS --json "$OUT/host_tails_gc$i.json" > /dev/null 2>&1
    summary "$OUT/host_tails_gc$i.json"
    PYTHONPATH=$PWD python3 "$NOGC" $ARGS --json "$OUT/host_tails_nogc$i.json" > /dev/null 2>&1
    summary "$OUT/host_tails_nogc$i.json"
  done ;;
affinity)  # run 143
  for m in pin1 free pin2; do
    if [ $m = free ]; then python3 -m pi0_policy_ros.engine.bench $ARGS --json "$OUT/host_tails_$m.json" > /dev/null 2>&1
    else taskset -c 5 python3 -m pi0_policy_ros.engine.bench $ARGS --json "$OUT/host_tails_$m.json" > /dev/null 2>&1; fi
    summary "$OUT/host_tails_$m.json"
  done ;;
esac
rm -f "$NOGC"
