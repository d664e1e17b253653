"""One graph launch per inference (notes, attempt 57).

`Engine._replay` enqueues an inference as eleven host calls: five event records, the pinned upload,
three graph replays (vision, prefix, the denoise chain) and the actions' download. The host tail of
attempts 48-55 slows every host instruction ~7× for a few ms, so each call before the GPU is fed is
exposed to it. This probe captures the upload, the three stages and the download into one graph per
inference (variant "whole", one graph per prefix layout) or keeps the engine's three graphs with
the upload inside the vision graph and the download inside the denoise graph ("three"), the timing
events captured inside as record nodes in both. On the bench's bf16 engine and observation (pi0.5,
2 of 3 cameras, 24 tokens) it reports:
- what each host call of `_replay` costs (µs, median and p99 over the run);
- capture time and device memory of each variant's graphs for every layout;
- the actions of each variant against `Engine.infer` on the same batches, and their event spans;
- end to end (wall, from `infer`'s start to the actions in numpy), the three paths (same batch
  check, plan and pinned load before each) in interleaved rounds.

    python3 bench/single_graph_probe.py --iterations 300 --rounds 4 --json OUT.json

Written against the engine of 2021339 (runs 172-173), before attempt 57 moved the copies and events
into its graphs and removed `Engine._stage_graphs`, which `_call_costs` replays.
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


def _timing_events() -> list[torch.cuda.Event]:
    """Events that become record nodes when captured (`external`), so a graph can carry them."""
    return [torch.cuda.Event(enable_timing=True, external=True) for _ in range(5)]


class Whole:
    """Variant A: per layout, one graph of the upload, the three stages and the download, with the
    timing events inside."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ev = _timing_events()
        self.graphs: dict[object, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        # every captured layout once, as the engine groups them (`Engine._buckets`)
        for rows in [rows for layouts in engine._buckets().values() for rows in layouts]:
            fns = engine._stage_fns(rows)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
                self.ev[0].record()
                upload(engine.host, engine.buf, rows.slots)
                self.ev[1].record()
                for i, name in enumerate(("vision", "prefix", "denoise")):
                    for fn in fns[name]:
                        fn()
                    self.ev[2 + i].record()
                engine.host.actions.copy_(engine.buf.actions, non_blocking=True)
            self.graphs[rows] = graph
        torch.cuda.synchronize()

    def infer(self, batch) -> np.ndarray:
        rows = self.engine._captured_layout(self.engine.load(batch))
        self.graphs[rows].replay()
        torch.cuda.current_stream().synchronize()
        return self.engine.host.actions.numpy().copy()


class Three:
    """Variant C: the engine's three graphs, the upload inside the vision graph (one per slot
    count and prompt), the download inside the denoise graph, the timing events inside them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ev = _timing_events()
        self.vision: dict[object, torch.cuda.CUDAGraph] = {}
        self.prefix: dict[object, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        for vision_rows, layouts in engine._buckets().items():  # a vision graph, then its prefix layouts
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
                self.ev[0].record()
                upload(engine.host, engine.buf, vision_rows.slots)
                self.ev[1].record()
                engine._stage_fns(vision_rows)["vision"][0]()
                self.ev[2].record()
            self.vision[vision_rows] = graph
            for rows in layouts:
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
                    engine._stage_fns(rows)["prefix"][0]()
                    self.ev[3].record()
                self.prefix[rows] = graph
        fns = engine._stage_fns(engine.shape.full_prefix)
        self.denoise = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.denoise, pool=pool):
            for fn in fns["denoise"]:
                fn()
            self.ev[4].record()
            engine.host.actions.copy_(engine.buf.actions, non_blocking=True)
        torch.cuda.synchronize()

    def infer(self, batch) -> np.ndarray:
        rows = self.engine._captured_layout(self.engine.load(batch))
        self.vision[self.engine._vision_layout(rows)].replay()
        self.prefix[rows].replay()
        self.denoise.replay()
        torch.cuda.current_stream().synchronize()
        return self.engine.host.actions.numpy().copy()


def _event_spans(ev: list[torch.cuda.Event]) -> dict[str, float]:
    names = ("h2d", "vision", "prefix", "denoise")
    return {n: round(ev[i].elapsed_time(ev[i + 1]), 4) for i, n in enumerate(names)}


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

    variants: dict[str, object] = {}
    for name, cls in (("whole", Whole), ("three", Three)):
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        variants[name] = cls(engine)
        result[f"{name}_capture_s"] = round(time.perf_counter() - t0, 3)
        result[f"{name}_device_mib"] = round((free0 - torch.cuda.mem_get_info()[0]) / 2**20, 1)
    result["whole_graphs"] = len(variants["whole"].graphs)
    # the same batches through every path: atomics make repeats differ by up to ~3e-3 in bf16
    checks: dict[str, list[float]] = {"engine_repeat": [], "whole": [], "three": []}
    spans: dict[str, object] = {}
    for b in batches:
        ref = engine.infer(b)
        spans.setdefault("engine", {k: round(engine.last_timings_ms[k], 4)
                                    for k in ("h2d", "vision", "prefix", "denoise")})
        checks["engine_repeat"].append(float(np.abs(engine.infer(b) - ref).max()))
        for name in ("whole", "three"):
            checks[name].append(float(np.abs(variants[name].infer(b) - ref).max()))
            spans.setdefault(name, _event_spans(variants[name].ev))
    result["max_abs_vs_engine"] = checks
    result["event_spans_ms"] = spans
    a0 = variants["whole"].infer(batches[0])
    result["whole_batches_differ_by"] = float(np.abs(a0 - variants["whole"].infer(batches[1])).max())
    # another layout (one camera, the whole prompt) through the whole graphs
    other = random_batch(shape, 7, valid_slots=1, valid_tokens=150)
    result["other_layout_whole_vs_engine"] = float(np.abs(variants["whole"].infer(other) - engine.infer(other)).max())

    paths = {"engine": engine.infer, "whole": variants["whole"].infer, "three": variants["three"].infer}
    order = list(paths)
    rounds = []
    for r in range(args.rounds):
        row: dict[str, object] = {}
        for path in order[r % 3:] + order[:r % 3]:
            walls = []
            for i in range(args.iterations):
                b = batches[i % len(batches)]
                t0 = time.perf_counter()
                paths[path](b)
                walls.append((time.perf_counter() - t0) * 1e3)
            row[path] = _stats(walls)
        rounds.append(row)
        print(f"round {r}: " + "; ".join(f"{p} {row[p]}" for p in order), flush=True)
    result["rounds_e2e_ms"] = rounds
    Path(args.json).write_text(json.dumps(result, indent=1))
    print("call costs (us):", json.dumps(result["call_costs_us"]))
    for k in ("whole_capture_s", "whole_device_mib", "three_capture_s", "three_device_mib", "whole_graphs",
              "max_abs_vs_engine", "event_spans_ms", "whole_batches_differ_by", "other_layout_whole_vs_engine"):
        print(k, json.dumps(result[k]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
