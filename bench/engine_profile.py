"""Kernel-level profile of one inference's stages (run op by op, not as graphs), for the notes.

Usage (on the GPU machine): python3 bench/engine_profile.py [--precision bfloat16] [--out DIR] [--full]
Default: the bench's observation (2 of 3 cameras, 24 prompt tokens) in its compact layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pi0_policy_ros.engine.engine import Engine
from pi0_policy_ros.engine.types import EngineShape, random_batch
from pi0_policy_ros.model.checkpoint import random_model
from pi0_policy_ros.model.config import get_preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--full", action="store_true", help="every camera slot and the whole prompt")
    args = parser.parse_args()
    cfg = get_preset(args.preset)
    model = random_model(cfg, args.device, torch.bfloat16, seed=0).to("cpu")
    shape = EngineShape.for_model(cfg)
    engine = Engine.create(model, shape, args.device, args.precision, mode="static")
    batch = random_batch(shape, 0, valid_slots=2, valid_tokens=24)  # the bench's default observation
    engine.infer(batch)
    engine.infer(batch)
    buf = engine.buf
    # the layout the bench times (compact: the valid slots, the prompt's bucket) unless --full
    rows = None if args.full else engine.last_prefix_rows
    slots = None if rows is None else rows.slots
    stages = {"vision": lambda: engine.vision.run(buf, slots), "prefix": lambda: engine.prefix.run(buf, rows),
              "denoise_step": lambda: engine.denoise.run_step(buf, 3)}
    lines = []
    for name, fn in stages.items():
        cuda = args.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof, torch.no_grad():
            fn()
            if cuda:
                torch.cuda.synchronize()
        def t(e) -> float:
            return e.device_time_total if cuda else e.self_cpu_time_total

        events = [e for e in prof.key_averages() if t(e) > 0]
        total = sum(t(e) for e in events)
        count = sum(e.count for e in events)
        lines.append(f"== {name} ({args.precision}): {count} kernels, {total / 1e3:.3f} ms of kernel time")
        for e in sorted(events, key=lambda e: -t(e))[:14]:
            lines.append(f"  {t(e) / 1e3:8.3f} ms {e.count:5d}x {e.key[:90]}")
    text = "\n".join(lines)
    print(text)
    Path(args.out, f"profile_{args.preset}_{args.precision}.txt").write_text(text)


if __name__ == "__main__":
    main()
