"""Is the host slower right after it waited (notes, attempt 50)? `host_prepare` takes 0.19-0.36 ms in
the bench, where its parts take ~0.06 ms run back to back (host_prepare_micro.py). Here the same
batch load into the pinned slab (and a fixed piece of pure-Python work) is timed right after the
thread slept 10 ms (time.sleep: the core may idle, drop its clock, lose its caches), right after it
spun 10 ms, and back to back. No GPU work; pinned memory needs CUDA when present.

    python3 bench/idle_wake_micro.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi0_policy_ros.engine.bench import _environment  # noqa: E402
from pi0_policy_ros.engine.buffers import allocate_host  # noqa: E402
from pi0_policy_ros.engine.types import EngineShape, plan_prefix, random_batch  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402


def _python_work() -> int:
    total = 0
    for i in range(2000):
        total += i * i
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    shape = EngineShape.for_model(get_preset("pi05"), num_slots=3)
    batches = [random_batch(shape, i, valid_slots=2, valid_tokens=24) for i in range(3)]
    host = allocate_host(shape, torch.cuda.is_available())

    def load(i: int) -> None:
        batch = batches[i % 3]
        batch.check(shape)
        rows, order = plan_prefix(shape, batch.image_masks, batch.token_mask, True)
        host.load(batch, order, rows.slots)

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    result: dict[str, object] = {"environment": _environment(), "us": {}}
    for wait in ("sleep", "spin", "none"):
        for name, fn in (("load", load), ("python_work", lambda i: _python_work())):
            samples = []
            for i in range(args.iterations):
                if wait == "sleep":
                    time.sleep(0.010)
                elif wait == "spin":
                    spin(0.010)
                t0 = time.perf_counter()
                fn(i)
                samples.append((time.perf_counter() - t0) * 1e6)
            stats = {"median": float(np.median(samples)), "p99": float(np.percentile(samples, 99))}
            result["us"][f"{name}_after_{wait}"] = stats
            print(f"{name:12s} after {wait:5s}: median {stats['median']:7.1f} us  p99 {stats['p99']:7.1f} us")
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
