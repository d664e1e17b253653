"""Where one step of the persistent Gluon kernel spends its time, phase by phase (H100).

Builds the full-size pi0.5 expert (random weights) and the step's buffers, runs one step of
`GluonDenoiseStep` built with TIMING (every program writes its SM clock when it arrives at and
leaves each grid barrier), and prints per phase kind: the slowest program's work (barrier left →
next barrier reached), the median program's, and the mean wait at the next barrier. SM clocks are
not synchronised across SMs, so only per-program spans are used; cycles → µs with the clock rate
measured against CUDA events on the same launch. One JSON line besides the table.
Run from the repository root: `python3 bench/gluon_step_profile.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi0_policy_ros.engine.denoise_gluon import PHASES_PER_LAYER, GluonDenoiseStep  # noqa: E402
from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402
from test.denoise_setup import make_step_inputs  # noqa: E402

KINDS = ("qkv", "attention", "combine", "o_proj", "gate_up", "down")


def main() -> None:
    inputs = make_step_inputs(get_preset("pi05"), torch.bfloat16, "cuda", seed=3, valid_prefix=600)
    buf = inputs.fresh_buffers()
    step = GluonDenoiseStep(TritonDenoiseStep(inputs.weights, inputs.tables, inputs.shape, buf))
    layers = len(inputs.weights.layers)
    n_sync = PHASES_PER_LAYER * layers
    with torch.no_grad():
        for _ in range(3):
            step.run(buf, 0)
        plain_ms = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.run(buf, 0)
            end.record()
            end.synchronize()
            plain_ms.append(start.elapsed_time(end))
        step.timing = torch.zeros(step.programs, 16 * layers + 2, dtype=torch.int64, device="cuda")
        for _ in range(3):
            step.run(buf, 0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.run(buf, 0)
        end.record()
        end.synchronize()
    t = step.timing.cpu().double()
    arrive, leave = t[:, 2::2][:, :n_sync], t[:, 3::2][:, :n_sync]  # column k - 1: barrier k = 1 .. n_sync - 1
    arrive[:, -1] = t[:, 2 * n_sync]  # the kernel's end as the last phase's arrival
    span_cycles = float((t[:, 2 * n_sync] - leave[:, 0]).max())
    step_ms = start.elapsed_time(end)
    # phase k (k ≥ 1) runs from leaving barrier k to arriving at barrier k + 1
    work = arrive[:, 1:] - leave[:, :-1]
    wait = leave[:, 1:-1] - arrive[:, 1:-1]
    rows = {}
    for kind_index, kind in enumerate(KINDS):
        cols = [k - 1 for k in range(1, n_sync) if k % PHASES_PER_LAYER == kind_index]
        w = work[:, cols]
        wait_cols = [c for c in cols if c < wait.shape[1]]
        rows[kind] = {"slowest_program_cycles": float(w.max(0).values.median()),
                      "median_program_cycles": float(w.median(0).values.median()),
                      "mean_wait_cycles": float(wait[:, wait_cols].mean()) if wait_cols else 0.0}
    # inside qkv (programs < 40) and gate_up (< 128): barrier left → rows normalised → MMAs done
    inner = t[:, 2 * n_sync + 2:].view(-1, layers, 4)
    for name, (j, progs, kind) in {"qkv": (0, 40, 0), "gate_up": (2, 128, 4)}.items():
        left = leave[:progs, [PHASES_PER_LAYER * l + kind - 1 for l in range(layers)]]
        if kind == 0:
            left[:, 0] = float("nan")  # layer 0's qkv has no barrier before it
        norm = inner[:progs, :, j] - left
        mma = inner[:progs, :, j + 1] - inner[:progs, :, j]
        rows[name].update(norm_cycles=float(norm[:, 1:].median()), mma_cycles=float(mma[:, 1:].median()))
    # calibrate: the step's kernel span in cycles against the whole step's event time (an upper bound)
    ghz = span_cycles / (step_ms * 1e6)
    print(f"step (action_in + kernel + head) {step_ms:.3f} ms with timing, {sorted(plain_ms)[10]:.3f} ms without; "
          f"kernel span {span_cycles:.0f} cycles → ≥ {ghz:.2f} GHz")
    print(f"{'phase':10s} {'slowest µs':>11s} {'median µs':>10s} {'wait µs':>8s}   (per layer, medians over layers)")
    for kind, r in rows.items():
        extra = (f"   norm {r['norm_cycles'] / ghz / 1e3:.2f}, MMAs {r['mma_cycles'] / ghz / 1e3:.2f}"
                 if "norm_cycles" in r else "")
        slowest, median = r["slowest_program_cycles"] / ghz / 1e3, r["median_program_cycles"] / ghz / 1e3
        print(f"{kind:10s} {slowest:11.2f} {median:10.2f} {r['mean_wait_cycles'] / ghz / 1e3:8.2f}{extra}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "step_ms_timing": step_ms,
                      "step_ms": sorted(plain_ms)[10], "span_cycles": span_cycles, "phases": rows}))


if __name__ == "__main__":
    main()
