#!/usr/bin/env bash
# One device call on the session's final code (engine unchanged): the GPU selftest on both openpi
# fixtures, the engine bench, then either the interrupt probe (when this machine has the host tail:
# bf16 p99 / median > 1.12) or the GPU tests. Writes under $OUT with the run number RUN.
# Usage (device machine, repo root): RUN=161 COMMIT=<full sha> bash bench/final_check_device.sh
# PROBE_TAIL=0: the GPU tests whatever the tail.
# COMMIT labels the outputs: the device's copy of the tree may carry another HEAD (run 161's read
# dcafbc4 with ce38fda's files as uncommitted changes).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RUN=${RUN:?set RUN}
COMMIT=${COMMIT:?set COMMIT}
commit=${COMMIT:0:7}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"
OUT="$OUT" COMMIT=$COMMIT timeout 150 bash bench/selftest_gpu.sh test/fixtures/openpi_reference \
  2>&1 | tee "$OUT/selftest_run$RUN.log"
mv "$OUT/selftest_gpu.jsonl" "$OUT/selftest_run$RUN.jsonl"
PI0_GIT_COMMIT=$commit PI0_GIT_DIRTY=0 timeout 200 python3 -m pi0_policy_ros.engine.bench --preset pi05 --cameras 3 \
  --valid-cameras 2 --valid-tokens 24 --precision bfloat16,fp8 --no-fp32-reference --iterations 200 \
  --eager-iterations 5 --json "$OUT/engine_run${RUN}_pi05.json" > "$OUT/engine_run${RUN}_pi05.log" 2>&1
grep -v "^INFO" "$OUT/engine_run${RUN}_pi05.log" | tail -30
tail_ratio=$(python3 -c "
import json; e = json.load(open('$OUT/engine_run${RUN}_pi05.json'))['precisions']['bfloat16']['timings_ms']['e2e']
print(f\"{e['p99'] / e['median']:.3f}\")")
echo "bf16 e2e p99 / median: $tail_ratio"
if [ "${PROBE_TAIL:-1}" = 1 ] && python3 -c "import sys; sys.exit(0 if $tail_ratio > 1.12 else 1)"; then
  PI0_GIT_COMMIT=$commit PI0_GIT_DIRTY=0 timeout 240 python3 bench/irq_tail_probe.py --iterations 1000 \
    --out "$OUT/irq_tail_probe_run$RUN" 2>&1 | tail -20
else
  timeout 280 python3 -m pytest test/gpu -q -p no:cacheprovider -rs 2>&1 | tail -40 > "$OUT/gpu_tests_run$RUN.log"
  grep -E "passed|failed|^E  " "$OUT/gpu_tests_run$RUN.log" | tail -8
fi
