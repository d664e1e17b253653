"""One graph launch per inference (notes, attempt 57).

`Engine._replay` enqueues an inference as eleven host calls: five event records, the pinned upload,
three graph replays (vision, prefix, the denoise chain) and the actions' download. The host tail of
attempts 48-55 slows every host instruction ~7× for a few ms, so each call before the GPU is fed is
exposed to it. This probe captures the upload, the three stages and the download into one graph per
inference and compares, on the bench's bf16 engine and observation (pi0.5, 2 of 3 cameras, 24
tokens):
- what each host call of `_replay` costs (µs, median and p99 over the run);
- the actions of the one-graph inference against `Engine.infer` on the same batches;
- end to end (wall, from `infer`'s start to the actions in numpy), the engine's path against the one
  graph (same batch check, plan and pinned load before it), in interleaved rounds.

    python3 bench/single_graph_probe.py --iterations 300 --rounds 4 --json OUT.json
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
from pi0_policy_ros.engine.buffers import upload  # noqa: E402
from pi0_policy_ros.engine.engine import Engine  # noqa: E402
from pi0_policy_ros.engine.types import EngineShape, random_batch  # noqa: E402
from pi0_policy_ros.model.checkpoint import random_model  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples)
    return {"median": round(float(np.median(a)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "max": round(float(a.max()), 4)}


def _call_costs(engine: Engine, batches: list, iterations: int) -> dict[str, dict[str, float]]:
    """`_replay`'s host calls one by one, as it makes them (µs)."""
    stream = torch.cuda.current_stream()
    ev = engine._events
    names = ("load", "event", "upload", "vision", "prefix", "denoise", "download", "sync")
    costs: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iterations):
        t = [time.perf_counter()]
        rows = engine.load(batches[i % len(batches)])
        t.append(time.perf_counter())
        ev[0].record(stream)
        t.append(time.perf_counter())
        upload(engine.host, engine.buf, rows.slots)
        t.append(time.perf_counter())
        graphs = engine._stage_graphs(rows)
        for name in ("vision", "prefix", "denoise"):
            for graph in graphs[name]:
                graph.replay()
            t.append(time.perf_counter())
        engine.host.actions.copy_(engine.buf.actions, non_blocking=True)
        t.append(time.perf_counter())
        stream.synchronize()
        t.append(time.perf_counter())
        for k, name in enumerate(names):
            costs[name].append((t[k + 1] - t[k]) * 1e6)
    return {n: _stats(v) for n, v in costs.items()}


def _capture_whole(engine: Engine, batch) -> tuple[torch.cuda.CUDAGraph, object]:
    """The upload, the three stages and the download of `batch`'s layout in one graph."""
    rows = engine._captured_layout(engine.load(batch))
    fns = engine._stage_fns(rows)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up outside the capture
        upload(engine.host, engine.buf, rows.slots)
        for name in ("vision", "prefix", "denoise"):
            for fn in fns[name]:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        upload(engine.host, engine.buf, rows.slots)
        for name in ("vision", "prefix", "denoise"):
            for fn in fns[name]:
                fn()
        engine.host.actions.copy_(engine.buf.actions, non_blocking=True)
    torch.cuda.synchronize()
    return graph, rows


def _infer_whole(engine: Engine, graph: torch.cuda.CUDAGraph, layout, batch) -> np.ndarray:
    rows = engine._captured_layout(engine.load(batch))
    if rows != layout:
        raise RuntimeError(f"batch layout {rows} is not the captured {layout}")
    graph.replay()
    torch.cuda.current_stream().synchronize()
    return engine.host.actions.numpy().copy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    cfg = get_preset("pi05")
    shape = EngineShape.for_model(cfg, num_slots=3)
    batches = [random_batch(shape, i, valid_slots=2, valid_tokens=24) for i in range(3)]
    model = random_model(cfg, torch.device("cuda"), torch.bfloat16, seed=0)
    engine = Engine.create(model, shape, torch.device("cuda"), "bfloat16")
    for b in batches * 20:
        engine.infer(b)
    result: dict[str, object] = {"environment": _environment()}
    result["call_costs_us"] = _call_costs(engine, batches, args.iterations)

    t0 = time.perf_counter()
    graph, layout = _capture_whole(engine, batches[0])
    result["capture_s"] = round(time.perf_counter() - t0, 3)
    # the same batches through both paths: the one graph against the engine (atomics make repeats
    # differ by up to ~3e-3 in bf16, the bench's repeat_max_abs)
    diffs, repeats = [], []
    for b in batches:
        ref = engine.infer(b)
        repeats.append(float(np.abs(engine.infer(b) - ref).max()))
        diffs.append(float(np.abs(_infer_whole(engine, graph, layout, b) - ref).max()))
    result["whole_vs_engine_max_abs"] = diffs
    result["engine_repeat_max_abs"] = repeats
    # a stale-buffer check: the one graph's actions follow the batch
    a0 = _infer_whole(engine, graph, layout, batches[0])
    a1 = _infer_whole(engine, graph, layout, batches[1])
    result["whole_batches_differ_by"] = float(np.abs(a0 - a1).max())

    rounds = []
    for r in range(args.rounds):
        row: dict[str, object] = {}
        for path in (("engine", "whole") if r % 2 == 0 else ("whole", "engine")):
            walls = []
            for i in range(args.iterations):
                b = batches[i % len(batches)]
                t0 = time.perf_counter()
                if path == "engine":
                    engine.infer(b)
                else:
                    _infer_whole(engine, graph, layout, b)
                walls.append((time.perf_counter() - t0) * 1e3)
            row[path] = _stats(walls)
        rounds.append(row)
        print(f"round {r}: engine {row['engine']} whole {row['whole']}", flush=True)
    result["rounds_e2e_ms"] = rounds
    Path(args.json).write_text(json.dumps(result, indent=1))
    print("call costs (us):", json.dumps(result["call_costs_us"]))
    print("capture_s", result["capture_s"], "whole vs engine", diffs, "engine repeats", repeats,
          "batches differ", result["whole_batches_differ_by"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
