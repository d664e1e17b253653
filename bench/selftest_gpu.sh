#!/usr/bin/env bash
# Runs `selftest` for both openpi reference fixtures in float32 and bfloat16 on the GPU and
# writes one JSON object per run to $OUT/selftest_gpu.jsonl (copied to bench/results/).
# Usage (device machine): COMMIT=<git sha> bash bench/selftest_gpu.sh <fixture dir>
set -euo pipefail
fixtures=${1:-.carry/fixtures}
out=${OUT:-/tmp}/selftest_gpu.jsonl
: > "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for model in pi05_small pi0_small; do
  for dtype in float32 bfloat16; do
    python3 -m pi0_policy_ros.selftest --reference "$fixtures/$model.safetensors" --device cuda --dtype "$dtype" \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r['commit']='${COMMIT:-unknown}'; print(json.dumps(r))" >> "$out"
  done
done
python3 -c "
import json
for line in open('$out'):
    r = json.loads(line)
    print(f\"{r['model']:>10} {r['dtype']:>9} {r['device']}: actions {r['max_abs_error']['actions']:.2e} \"
          f\"layer0_key {r['max_abs_error']['layer0_key']:.2e} v0 {r['max_abs_error']['first_velocity']:.2e} passed={r['passed']}\")
"
