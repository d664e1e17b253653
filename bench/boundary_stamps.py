"""What one kernel boundary of the denoise chain costs where it runs (attempt 43, run 129). Two
no-op kernels, A then B, are put between qkv and the attention of every layer; each program of them
reads the GPU's global timer (ns, the same clock on every SM) when it starts and again once its PDL
wait has returned. From the last replay of the chain:

- `resident_before_release`: A's first release minus A's last start (> 0: every program was resident
  before qkv ended);
- `handoff`: B's first release minus A's last release: one no-op kernel's completion → the next one's
  release, with the chain's other kernels around it;
- `spread_a`: A's last release minus its first (all programs are released by one event).

Also the chain's time with and without the two no-ops. `--pdl 1`: the no-ops wait, then let the next
kernel launch (the default is the engine's `pdl_early` order, 2).

    PYTHONPATH=. python bench/boundary_stamps.py [--pdl 2] [--grid 45] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from bench.chain_setup import bench_pi05_engine
from pi0_policy_ros.engine import kernels_gluon as G
from pi0_policy_ros.engine.bench import time_chain_variant
from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep


@gluon.jit
def _now():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def stamp_kernel(out_ptr, slot, PDL: gl.constexpr):
    """out[slot, program] = (global time at start, global time once the PDL wait returned)."""
    start = _now()
    G._pdl_enter(PDL)
    released = _now()
    base = out_ptr + (slot * gl.num_programs(0) + gl.program_id(0)) * 2
    gl.store(base, start)
    gl.store(base + 1, released)


class StampedStep(TritonDenoiseStep):
    """The engine's step with the two stamp kernels before every attention."""

    def __init__(self, *args, stamps: torch.Tensor, grid: int, pdl: int) -> None:
        super().__init__(*args)
        self.stamps, self.grid, self.pdl_mode = stamps, grid, pdl
        self.step = 0

    def run(self, buf, step: int) -> None:
        self.step = step
        super().run(buf, step)

    def _attention(self, buf, layer, q, out, lse) -> None:
        for j in range(2):
            slot = (self.step * len(self.w.layers) + layer) * 2 + j
            stamp_kernel[(self.grid,)](self.stamps, slot, PDL=self.pdl_mode, num_warps=4, launch_pdl=True)
        super()._attention(buf, layer, q, out, lse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdl", type=int, default=2, choices=(1, 2))
    parser.add_argument("--grid", type=int, default=45, help="programs per no-op (the attention has 45)")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    engine = bench_pi05_engine()
    layers, steps = len(engine.expert_weights.layers), engine.shape.num_steps
    stamps = torch.zeros(steps * layers * 2, args.grid, 2, dtype=torch.int64, device="cuda")
    plain = TritonDenoiseStep(engine.expert_weights, engine.tables, engine.shape, engine.buf)
    stamped = StampedStep(engine.expert_weights, engine.tables, engine.shape, engine.buf, stamps=stamps,
                          grid=args.grid, pdl=args.pdl)
    chain = {name: time_chain_variant(engine, step, iterations=args.iterations).chain_ms["median"]
             for name, step in (("engine", plain), ("with two no-ops", stamped), ("engine again", plain))}
    s = stamps.cpu().view(steps, layers, 2, args.grid, 2).double() / 1e3  # µs
    rows = {"resident_before_release": [], "handoff": [], "spread_a": []}
    for k in range(steps):
        for i in range(1, layers):
            a, b = s[k, i, 0], s[k, i, 1]
            rows["resident_before_release"].append(float(a[:, 1].min() - a[:, 0].max()))
            rows["handoff"].append(float(b[:, 1].min() - a[:, 1].max()))
            rows["spread_a"].append(float(a[:, 1].max() - a[:, 1].min()))
    ticks = sorted({float(v) for v in (s[..., 1] - s[..., 0]).flatten().tolist() if v > 0})[:5]
    report = {"device": torch.cuda.get_device_name(), "pdl": args.pdl, "grid": args.grid,
              "chain_ms": {k: round(v, 3) for k, v in chain.items()},
              "us": {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
                     for k, v in rows.items()},
              "smallest_waits_us": ticks}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
