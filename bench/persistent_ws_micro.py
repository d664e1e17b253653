"""A persistent denoise-step kernel whose weight stream does not wait for its barriers (H100 micro).

`persistent_micro.py` found every Triton form of the step's weight stream at 1.2-1.45 TB/s and a
grid barrier at 1.3 µs: each dependent phase pays its pipeline's fill and drain again. Here
(Gluon, Triton's explicit-layout dialect) one warp per SM only issues TMA copies of the weight
tiles, for all the step's phases in order, into a ring of shared-memory slots, and never waits
for a barrier: it runs ahead by the ring's depth. The 4 MMA warps wait for a tile, multiply it
with the unit's activations (read from L2 once per unit, after the grid barrier, into shared
memory), and free the slot.
Same phases and bytes as `persistent_micro.py` (qkv, out split-K 8, gate_up, down split-K 8;
18 layers; 623 MB a step); the weights are stored pre-tiled ([64, 256] tiles in consumption
order: a layout the engine could make at fuse time). Throughput only: no epilogues, no
numerics. Variants: `ws_persistent` (a grid barrier after every phase), `_nobarrier`,
`ws_barriers_only` (no tiles), and `ws_local_pause` (each program pauses ~1.2 µs on its own clock
instead of the barrier: no atomics, no fences) with `_only`, and `ws_relaxed_barrier` (the barrier
with relaxed atomics: no ordering, timing only), `_acquire_only_` / `_release_only_barrier` (one
half ordered). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from persistent_micro import LAYER_PHASES, time_graph  # bench/ is the script's folder

BLOCK_N, BLOCK_K, BLOCK_M = 64, 256, 16
X_COLS = 4096
X_UNIT_COLS = 1024  # the most K columns one unit multiplies (qkv, gate_up)


@gluon.jit
def _clock():
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _grid_barrier(cnt_ptr, target, ARRIVE: gl.constexpr, POLL: gl.constexpr):
    """Arrive with memory order ARRIVE, poll with POLL ("release" / "acquire" is the correct pair)."""
    gl.thread_barrier()
    gl.atomic_add(cnt_ptr, 1, sem=ARRIVE, scope="gpu")
    seen = gl.atomic_add(cnt_ptr, 0, sem=POLL, scope="gpu")
    while seen < target:
        seen = gl.atomic_add(cnt_ptr, 0, sem=POLL, scope="gpu")
    gl.thread_barrier()


@gluon.jit
def _producer(w_desc, ring, ready, empty, table_ptr, n_phases, pid, g):
    """Every weight tile this program will multiply, in order, as fast as the ring frees up."""
    num_slots: gl.constexpr = ring.type.shape[0]
    rows: gl.constexpr = w_desc.block_type.shape[0]
    i = 0
    for p in range(n_phases):
        base = gl.load(table_ptr + 3 * p)
        units = gl.load(table_ptr + 3 * p + 1)
        k_tiles = gl.load(table_ptr + 3 * p + 2)
        for u in range(pid, units, g):
            for j in range(k_tiles):
                slot = i % num_slots
                mbarrier.wait(empty.index(slot), ((i // num_slots) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [(base + u * k_tiles + j) * rows, 0], ready.index(slot),
                                                ring.index(slot))
                i += 1


@gluon.jit
def _consumer(ring, ready, empty, x_smem, x_ptr, out_ptr, table_ptr, cnt_ptr, n_phases, pid, g,
              BARRIER: gl.constexpr, ARRIVE: gl.constexpr, POLL: gl.constexpr, MMA_LAYOUT: gl.constexpr,
              X_LAYOUT: gl.constexpr):
    num_slots: gl.constexpr = ring.type.shape[0]
    rows: gl.constexpr = ring.type.shape[1]
    block_k: gl.constexpr = ring.type.shape[2]
    block_m: gl.constexpr = x_smem.type.shape[0]
    x_cols: gl.constexpr = x_smem.type.shape[1]
    rm = gl.arange(0, block_m, layout=gl.SliceLayout(1, X_LAYOUT))
    rk = gl.arange(0, x_cols, layout=gl.SliceLayout(0, X_LAYOUT))
    total = gl.zeros([rows, block_m], gl.float32, layout=MMA_LAYOUT)
    i = 0
    for p in range(n_phases):
        units = gl.load(table_ptr + 3 * p + 1)
        k_tiles = gl.load(table_ptr + 3 * p + 2)
        for u in range(pid, units, g):
            acc = gl.zeros([rows, block_m], gl.float32, layout=MMA_LAYOUT)
            # the unit's activations (≤ x_cols columns) in one round trip, then its K tiles from smem
            xv = gl.load(x_ptr + rm[:, None] * 4096 + rk[None, :], mask=rk[None, :] < k_tiles * block_k, other=0.0)
            x_smem.store(xv)
            fence_async_shared()
            gl.thread_barrier()
            for j in gl.static_range(x_cols // block_k):  # static: smem slices need constant offsets
                if j < k_tiles:
                    slot = i % num_slots
                    mbarrier.wait(ready.index(slot), (i // num_slots) & 1)
                    x_tile = x_smem.slice(j * block_k, block_k, dim=1)
                    acc = warpgroup_mma(ring.index(slot), x_tile.permute((1, 0)), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                    mbarrier.arrive(empty.index(slot), count=1)
                    i += 1
            total += acc
        if BARRIER == "pause":  # a local pause as long as a barrier, without its atomics and fences
            start = _clock()
            while _clock() - start < 2200:
                pass
        elif BARRIER != "none":  # grid-wide: every program's phase p is done before any starts p + 1
            _grid_barrier(cnt_ptr, (p + 1) * g, ARRIVE, POLL)
    rn = gl.arange(0, rows, layout=gl.SliceLayout(1, MMA_LAYOUT))
    rm = gl.arange(0, block_m, layout=gl.SliceLayout(0, MMA_LAYOUT))
    gl.store(out_ptr + pid * rows * block_m + rn[:, None] * block_m + rm[None, :], total)


@gluon.jit
def ws_persistent_kernel(w_desc, x_ptr, out_ptr, table_ptr, cnt_ptr, n_phases, BARRIER: gl.constexpr,
                         ARRIVE: gl.constexpr, POLL: gl.constexpr,
                         NUM_SLOTS: gl.constexpr, BLOCK_M: gl.constexpr, X_SMEM_LAYOUT: gl.constexpr,
                         X_UNIT_COLS: gl.constexpr):
    rows: gl.constexpr = w_desc.block_type.shape[0]
    block_k: gl.constexpr = w_desc.block_type.shape[1]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_M, 16])
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    ring = gl.allocate_shared_memory(w_desc.dtype, [NUM_SLOTS, rows, block_k], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_SLOTS, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_SLOTS):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, X_UNIT_COLS], X_SMEM_LAYOUT)
    pid = gl.program_id(0)
    g = gl.num_programs(0)
    gl.warp_specialize([
        (_consumer, (ring, ready, empty, x_smem, x_ptr, out_ptr, table_ptr, cnt_ptr, n_phases, pid, g, BARRIER,
                     ARRIVE, POLL, mma_layout, x_layout)),
        (_producer, (w_desc, ring, ready, empty, table_ptr, n_phases, pid, g)),
    ], [1], [24])


def phase_table(layers: int, empty: bool) -> list[tuple[int, int, int]]:
    """(first tile, units, K tiles per unit) per phase; tiles are stored in consumption order."""
    rows, base = [], 0
    for _ in range(layers):
        for n, k, splits in LAYER_PHASES:
            units, k_tiles = (n // BLOCK_N) * splits, k // splits // BLOCK_K
            k_tiles = max(1, k_tiles)
            rows.append((base, 0 if empty else units, k_tiles))
            base += units * k_tiles
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--slots", type=int, default=5, help="ring slots of [64, 256] bf16 (32 KB each)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    programs = torch.cuda.get_device_properties(dev).multi_processor_count
    phases = phase_table(args.layers, empty=False)
    n_tiles = sum(units * k_tiles for _, units, k_tiles in phases)
    w = torch.randn(n_tiles * BLOCK_N, BLOCK_K, dtype=torch.bfloat16, device=dev) * 0.02
    w_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [BLOCK_N, BLOCK_K], w_layout)
    x = torch.randn(BLOCK_M, X_COLS, dtype=torch.bfloat16, device=dev)
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, X_UNIT_COLS], gl.bfloat16)
    out = torch.zeros(programs, BLOCK_N * BLOCK_M, dtype=torch.float32, device=dev)
    counters = torch.zeros(args.steps, dtype=torch.int32, device=dev)
    tables = {empty: torch.tensor(phase_table(args.layers, empty), dtype=torch.int32, device=dev).flatten()
              for empty in (False, True)}

    def run(empty: bool, barrier: str, arrive: str = "release", poll: str = "acquire"):
        def launch() -> None:
            counters.zero_()
            for step in range(args.steps):
                ws_persistent_kernel[(programs,)](w_desc, x, out, tables[empty], counters[step:], len(phases),
                                                  BARRIER=barrier, ARRIVE=arrive, POLL=poll, NUM_SLOTS=args.slots,
                                                  BLOCK_M=BLOCK_M, X_SMEM_LAYOUT=x_layout, X_UNIT_COLS=X_UNIT_COLS,
                                                  num_warps=4)
        return launch

    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
              "programs": programs, "steps": args.steps, "layers": args.layers, "slots": args.slots,
              "weight_bytes_per_step": 2 * n_tiles * BLOCK_N * BLOCK_K, "phases_per_step": len(phases)}
    for name, fn in (("ws_persistent", run(False, "grid")), ("ws_persistent_nobarrier", run(False, "none")),
                     ("ws_barriers_only", run(True, "grid")), ("ws_local_pause", run(False, "pause")),
                     ("ws_local_pause_only", run(True, "pause")),
                     ("ws_relaxed_barrier", run(False, "grid", "relaxed", "relaxed")),
                     ("ws_acquire_only_barrier", run(False, "grid", "relaxed", "acquire")),
                     ("ws_release_only_barrier", run(False, "grid", "release", "relaxed"))):
        t = time_graph(fn, args.reps)
        med = t[len(t) // 2]
        result[name] = {"median_ms": round(med, 4), "p90_ms": round(t[int(0.9 * (len(t) - 1))], 4),
                        "per_step_us": round(1000 * med / args.steps, 2),
                        "tb_per_s": round(result["weight_bytes_per_step"] * args.steps / (med * 1e-3) / 1e12, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
