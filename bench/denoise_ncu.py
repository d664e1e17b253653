"""One pi0.5 denoise step (full-size random model, the bench's observation) run op by op between
cudaProfilerStart / Stop, for Nsight Compute to read the step's kernels' counters (notes attempt 33).

Usage (GPU machine):
    ncu --profile-from-start off --clock-control none --cache-control none --launch-count 8 \
        --section SpeedOfLight --section WarpStateStats ... python3 bench/denoise_ncu.py   (PYTHONPATH=.; the
    exact command of run 86 is in bench/results/README_engine.md)
"""

from __future__ import annotations

import torch

from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.types import EngineShape, random_batch
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset


def main() -> None:
    cfg = get_preset("pi05")
    model = random_model(cfg, "cuda", torch.bfloat16, seed=0).to("cpu")
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, "cuda", "bfloat16", mode="static")
    batch = random_batch(shape, 0, valid_slots=2, valid_tokens=24)
    for _ in range(2):  # compile, then fill the KV cache with this observation's prefix
        engine.infer(batch)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    with torch.no_grad():
        engine.denoise.run_step(engine.buf, 3)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("step profiled")


if __name__ == "__main__":
    main()
