#!/usr/bin/env bash
# On the GPU machine, in one `run` call with carry [".whl"] (see bench/ros_device_env.sh):
#   OUT=$OUT COMMIT=<sha> bash bench/exit_signals_gpu.sh      (GPU_TESTS=0: the signal cases only)
# The node's process with full-size pi0.5 on CUDA (config/demo_cuda.yaml, autostart) signalled while
# active, during configure and twice during configure (bench/exit_signals.py), then the GPU tests.
set -u
source bench/ros_device_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
python3 bench/exit_signals.py --params config/demo_cuda.yaml --json "$OUT/exit_signals_gpu.json" 2>&1 | tee "$OUT/exit_signals_gpu.txt"
echo "GPU processes left: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"
if [ "${GPU_TESTS:-1}" = 1 ]; then
  python3 -m pytest test/gpu -q -p no:cacheprovider -rs > "$OUT/gpu_tests.log" 2>&1
  tail -3 "$OUT/gpu_tests.log"
fi
