"""Could denoise step 0 run beside the prefix (notes, attempt 58)?

Step 0's layer l needs the prefix's K/V of layer l only, so a pipelined step 0 could follow the
prefix layer by layer on a second stream, and the chain after the prefix would be nine steps. The
prefix keeps all SMs busy in its big GEMMs but not in its qkv / out projections (40-50 tiles), its
attention (68 row tiles) or its row kernels, and CUDA graphs keep the capturing stream's priority
per kernel node (torch >= 2.10 instantiates with `cudaGraphInstantiateFlagUseNodePriority`).
This probe measures only the contention, with no data dependency between the two (step 0 reads
whatever K/V the cache holds): graphs of the prefix alone, step 0 alone, both in sequence, and both
forked on two streams, step 0 at lower or equal priority. The gain a pipelined step 0 could give is
at most sequence − forked.

    python3 bench/overlap_probe.py --iterations 200 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi0_policy_ros.engine.bench import _environment  # noqa: E402
from pi0_policy_ros.engine.engine import Engine  # noqa: E402
from pi0_policy_ros.engine.types import EngineShape, random_batch  # noqa: E402
from pi0_policy_ros.model.checkpoint import random_model  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402


def _capture(fn: Callable[[], None], stream: torch.cuda.Stream, pool) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, pool=pool, stream=stream):
        fn()
    return graph


def _time(graph: torch.cuda.CUDAGraph, iterations: int) -> dict[str, float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(iterations):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    a = np.asarray(samples)
    return {"median": round(float(np.median(a)), 4), "p99": round(float(np.percentile(a, 99)), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    cfg = get_preset("pi05")
    shape = EngineShape.for_model(cfg, num_slots=3)
    batch = random_batch(shape, 0, valid_slots=2, valid_tokens=24)
    model = random_model(cfg, torch.device("cuda"), torch.bfloat16, seed=0)
    engine = Engine.create(model, shape, torch.device("cuda"), args.precision)
    for _ in range(10):
        engine.infer(batch)  # the buffers now hold a real prefix layout's inputs and K/V
    rows = engine._captured_layout(engine.last_prefix_rows)
    prefix = engine._stage_fns(rows)["prefix"][0]

    def step0() -> None:
        engine.denoise.run_step(engine.buf, 0)

    # a lower number is a higher priority; torch maps -10 to the greatest it has (-3 in run 176)
    low, high, equal = (torch.cuda.Stream(priority=p) for p in (0, -10, -10))

    def forked(side: torch.cuda.Stream) -> Callable[[], None]:
        def fn() -> None:
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                step0()
            prefix()
            main.wait_stream(side)
        return fn

    pool = torch.cuda.graph_pool_handle()
    graphs = {
        "prefix": _capture(prefix, high, pool),
        "step0": _capture(step0, high, pool),
        "sequence": _capture(lambda: (prefix(), step0()), high, pool),
        "forked_step0_low": _capture(forked(low), high, pool),
        "forked_equal": _capture(forked(equal), high, pool),
    }
    torch.cuda.synchronize()
    result: dict[str, object] = {"environment": _environment(), "precision": args.precision,
                                 "priorities": [low.priority, high.priority],
                                 "prefix_rows": [rows.slots, rows.prompt, rows.leading_keys], "rounds": []}
    for r in range(args.rounds):
        row = {name: _time(graph, args.iterations) for name, graph in graphs.items()}
        result["rounds"].append(row)
        print(f"round {r}: " + "; ".join(f"{k} {v['median']:.3f}" for k, v in row.items()), flush=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
