"""Where `host_prepare` goes (notes, attempt 50): the batch check, the prefix plan and the copy into
the host slab, each timed alone at the bench's layout (pi0.5, 3 slots of which 2 valid, 24 tokens,
224x224 frames), into pinned and into pageable memory. No model, no GPU work: only the allocation of
pinned memory needs CUDA. `--sleep-ms 10`: each timed call comes right after a sleep, as an
inference does after the ~10 ms wait for the previous one (attempt 59: what runs cold).

    python3 bench/host_prepare_micro.py --json OUT.json [--sleep-ms 10 --iterations 300]
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
from pi0_policy_ros.engine.types import EngineShape, PrefixPlanner, plan_prefix, random_batch  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402


def _time_us(fn, iterations: int, sleep_s: float = 0.0) -> dict[str, float]:
    for _ in range(200):
        fn()
    samples = []
    for _ in range(iterations):
        if sleep_s:
            time.sleep(sleep_s)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return {"median": float(np.median(samples)), "p99": float(np.percentile(samples, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--sleep-ms", type=float, default=0.0, help="sleep before each timed call")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    n, sleep_s = args.iterations, args.sleep_ms / 1e3
    shape = EngineShape.for_model(get_preset("pi05"), num_slots=3)
    batch = random_batch(shape, 0, valid_slots=2, valid_tokens=24)
    rows, order = plan_prefix(shape, batch.image_masks, batch.token_mask, True)
    result: dict[str, object] = {"environment": _environment(), "sleep_ms": args.sleep_ms, "us": {}}
    timings = result["us"]
    timings["check"] = _time_us(lambda: batch.check(shape), n, sleep_s)
    timings["plan_prefix"] = _time_us(lambda: plan_prefix(shape, batch.image_masks, batch.token_mask, True),
                                      n, sleep_s)
    for pinned in (True, False) if torch.cuda.is_available() else (False,):
        host = allocate_host(shape, pinned)
        timings[f"load_{'pinned' if pinned else 'pageable'}"] = _time_us(
            lambda host=host: host.load(batch, order, rows.slots), n, sleep_s)
        image = host.images.numpy()
        timings[f"image_copy_{'pinned' if pinned else 'pageable'}"] = _time_us(
            lambda image=image: np.copyto(image[0], batch.images[0]), n, sleep_s)
    # The whole of Engine.load (check, the remembered plan, copy) as one cold call.
    host = allocate_host(shape, torch.cuda.is_available())
    planner = PrefixPlanner(shape, True)
    timings["planner"] = _time_us(lambda: planner(batch.image_masks, batch.token_mask), n, sleep_s)

    def whole() -> None:
        batch.check(shape)
        rows_now, order_now = planner(batch.image_masks, batch.token_mask)
        host.load(batch, order_now, rows_now.slots)

    timings["check_plan_load"] = _time_us(whole, n, sleep_s)
    Path(args.json).write_text(json.dumps(result, indent=1))
    for name, t in timings.items():
        print(f"{name:24s} median {t['median']:8.1f} us  p99 {t['p99']:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
