#!/usr/bin/env bash
# One device call: GPU tests, a kernel profile, then the engine bench. Writes under $OUT.
# Knobs: GPU_TESTS (pytest paths, "none" to skip), PROFILE=1, RUN_PI05 (default 1), RUN_PI0=1,
# PRECISIONS (pi0.5), VARIANTS (default --variants; " " for none), RTC=1 (--rtc on both presets).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"
if [ "${GPU_TESTS:-test/gpu}" != none ]; then
timeout ${TEST_TIMEOUT:-240} python3 -m pytest ${GPU_TESTS:-test/gpu} -q -p no:cacheprovider -rs 2>&1 | tail -60 > "$OUT/gpu_tests.log"; grep -E "passed|failed|^E  |SKIP" "$OUT/gpu_tests.log" | tail -12
fi
if [ -n "$PROFILE" ]; then
PYTHONPATH=. timeout 150 python3 bench/engine_profile.py --precision bfloat16 --out "$OUT" > "$OUT/profile.log" 2>&1
fi
if [ "${RUN_PI05:-1}" = 1 ]; then
timeout 360 python3 -m pi0_policy_ros.engine.bench --preset pi05 --cameras 3 --valid-cameras 2 --valid-tokens 24 \
  --precision ${PRECISIONS:-bfloat16,fp8,float32} ${VARIANTS:---variants} ${RTC:+--rtc} --iterations 200 --json "$OUT/pi05.json" 2>&1 | tee "$OUT/pi05.log" | grep -v "^INFO"
fi
if [ -n "$RUN_PI0" ]; then
timeout 200 python3 -m pi0_policy_ros.engine.bench --preset pi0 --cameras 3 --valid-cameras 2 --valid-tokens 20 \
  --precision bfloat16 --no-fp32-reference ${RTC:+--rtc} --iterations 100 --json "$OUT/pi0.json" 2>&1 | tee "$OUT/pi0.log" | grep -v "^INFO" | tail -16
fi
cat "$OUT"/profile_*.txt 2>/dev/null || tail -5 "$OUT/profile.log" 2>/dev/null
