"""`Policy.infer` timed outside ROS: where the time between the engine's end-to-end number and the
node's `infer` latency goes (preprocess, the engine's own stages, postprocess), per call, JSON.

    python bench/policy_timing.py [--profile pi05_aloha] [--height 480 --width 640] [--iterations 200] [--engine-resize]

Random weights (default: full-size pi0.5, bf16 on CUDA; `--device cpu --preset pi05_small
--precision float32` runs anywhere), one observation per call with new random images of the given
size for every camera of the profile. `--engine-resize` sets camera_height / camera_width to that
size, so the frames are resized with pad in the engine's vision graph instead of on the CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time

import numpy as np
import torch

from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.policy import Policy
from pi0_policy_ros.policy.robots import get_profile
from pi0_policy_ros.policy.types import Observation


def _profile_prepare(policy: Policy, obs: Observation, calls: int = 50) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        policy.network_batch(obs)
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="pi05_aloha")
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--engine-resize", action="store_true",
                        help="resize in the engine (camera_height / camera_width = the image size), not on the CPU")
    parser.add_argument("--profile-prepare", action="store_true",
                        help="also print cProfile's top functions of the host-side preparation (network_batch)")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    config = PolicyConfig(model_preset=args.preset, robot_profile=args.profile, device=args.device,
                          precision=args.precision, default_prompt="pick up the red block",
                          camera_height=args.height if args.engine_resize else 0,
                          camera_width=args.width if args.engine_resize else 0)
    t0 = time.perf_counter()
    policy = Policy.from_config(config)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {}
    walls = []
    for i in range(args.iterations + 10):
        images = {name: rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
                  for name, _slot in profile.camera_slots}
        obs = Observation(images=images, state=rng.standard_normal(profile.state_dim).astype(np.float32),
                          stamp_s=float(i))
        start = time.perf_counter()
        chunk = policy.infer(obs)
        wall = (time.perf_counter() - start) * 1e3
        if i >= 10:  # the first calls pay one-off costs
            walls.append(wall)
            for key, value in chunk.timings_ms.items():
                samples.setdefault(key, []).append(value)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    if args.profile_prepare:
        _profile_prepare(policy, obs)
    result = {"device": device, "profile": args.profile, "preset": args.preset,
              "image_hw": [args.height, args.width], "engine_resize": args.engine_resize, "iterations": args.iterations, "build_s": round(build_s, 1),
              "wall_ms_p50": statistics.median(walls),
              "timings_ms_p50": {k: round(statistics.median(v), 3) for k, v in samples.items()}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
