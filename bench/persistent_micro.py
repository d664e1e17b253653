"""Can one persistent kernel per denoise step beat ~110 launches? A feasibility micro (H100).

Streams the expert's weight bytes in the denoise step's GEMM shapes (per layer: qkv [2560, 1024],
out [1024, 2048] split-K 8, gate_up [8192, 1024], down [1024, 4096] split-K 8; 18 layers, 10
steps), as [64, BLOCK_K] weight tiles times a [BLOCK_K, 16] activation tile on the tensor cores,
four ways:
- `launches`: one kernel per GEMM phase (grid = its tiles), all captured in one CUDA graph;
- `tma_launches`: the same, the weight tiles loaded by the TMA engine (host tensor descriptors);
- `persistent`: one kernel per step, a program per SM, a grid-wide barrier after every phase;
- `persistent_nobarrier`: the same without the barriers (the streaming rate alone);
and `barriers_only` (the phases with no tiles): the barriers' own cost. Unless `--skip-prefetch`,
also the persistent kernel asking L2 for the weights of the phase one or two ahead.
Prints one JSON line. Numbers go to `bench/results/`; the engine's kernels are not involved.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

BLOCK_M = 16
LAYER_PHASES = ((2560, 1024, 1), (1024, 2048, 8), (8192, 1024, 1), (1024, 4096, 8))  # (N, K, K splits)


@triton.jit
def _grid_barrier(cnt_ptr, target):
    """Every program arrives (release) and waits until `target` programs have (acquire)."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _tile_units(w_ptr, x_ptr, unit0, unit_step, w_off, N, K, splits, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    k_per = K // splits
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for u in range(unit0, (N // BLOCK_N) * splits, unit_step):
        nb = u // splits
        k_lo = (u % splits) * k_per
        for k0 in range(k_lo, k_lo + k_per, BLOCK_K):
            w = tl.load(w_ptr + w_off + (nb * BLOCK_N + rn)[:, None] * K + (k0 + rk)[None, :])
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :])  # [BLOCK_M, BLOCK_K], as the engine's
            total += tl.dot(w, tl.trans(x))
    return total


@triton.jit
def _prefetch_units(w_ptr, unit0, unit_step, w_off, N, K, splits, BLOCK_N: tl.constexpr):
    """Ask L2 for this program's weight rows of one phase (one bulk prefetch per row segment)."""
    rn = tl.arange(0, BLOCK_N)
    k_per = K // splits
    for u in range(unit0, (N // BLOCK_N) * splits, unit_step):
        rows = w_ptr + w_off + ((u // splits) * BLOCK_N + rn).to(tl.int64) * K + (u % splits) * k_per
        nbytes = tl.full([BLOCK_N], 0, tl.int32) + k_per * 2
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                  [rows, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _phase_row(table_ptr, p):
    w_off = tl.multiple_of(tl.load(table_ptr + 4 * p), 64)  # tables: multiples of 64 (vector loads)
    n = tl.multiple_of(tl.load(table_ptr + 4 * p + 1), 64)
    k = tl.multiple_of(tl.load(table_ptr + 4 * p + 2), 64)
    return w_off, n, k, tl.load(table_ptr + 4 * p + 3)


@triton.jit
def phase_kernel(w_ptr, x_ptr, out_ptr, w_off, N, K, splits, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    total = _tile_units(w_ptr, x_ptr, pid, tl.num_programs(0), w_off, N, K, splits, BLOCK_N, BLOCK_K, BLOCK_M)
    tl.store(out_ptr + pid * BLOCK_N * BLOCK_M + tl.arange(0, BLOCK_N * BLOCK_M),
             tl.reshape(total, [BLOCK_N * BLOCK_M]))


@triton.jit
def tma_phase_kernel(w_desc, x_ptr, out_ptr, K, splits, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """`phase_kernel`, one tile set per program, the weight tiles through the TMA engine."""
    u = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    k_per = K // splits
    k_lo = (u % splits) * k_per
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per, BLOCK_K):
        w = w_desc.load([(u // splits) * BLOCK_N, k0])
        x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        total += tl.dot(w, tl.trans(x))
    tl.store(out_ptr + u * BLOCK_N * BLOCK_M + tl.arange(0, BLOCK_N * BLOCK_M), tl.reshape(total, [BLOCK_N * BLOCK_M]))


@triton.jit
def persistent_kernel(w_ptr, x_ptr, out_ptr, table_ptr, cnt_ptr, n_phases, BARRIER: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, AHEAD: tl.constexpr = 0):
    """AHEAD > 0: at the start of phase p, prefetch phase p + AHEAD's weights into L2 (and phases
    0 .. AHEAD - 1 at the start), so HBM streams on through the barriers."""
    pid = tl.program_id(0)
    g = tl.num_programs(0)
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for p in range(0, AHEAD):
        if p < n_phases:
            w_off, n, k, splits = _phase_row(table_ptr, p)
            _prefetch_units(w_ptr, pid, g, w_off, n, k, splits, BLOCK_N)
    for p in range(n_phases):
        if AHEAD > 0:
            if p + AHEAD < n_phases:
                w_off, n, k, splits = _phase_row(table_ptr, p + AHEAD)
                _prefetch_units(w_ptr, pid, g, w_off, n, k, splits, BLOCK_N)
        w_off, n, k, splits = _phase_row(table_ptr, p)
        total += _tile_units(w_ptr, x_ptr, pid, g, w_off, n, k, splits, BLOCK_N, BLOCK_K, BLOCK_M)
        if BARRIER:
            _grid_barrier(cnt_ptr, (p + 1) * g)
    tl.store(out_ptr + pid * BLOCK_N * BLOCK_M + tl.arange(0, BLOCK_N * BLOCK_M),
             tl.reshape(total, [BLOCK_N * BLOCK_M]))


def _phases(layers: int, empty: bool, block_k: int) -> list[tuple[int, int, int, int]]:
    rows, off = [], 0
    for _ in range(layers):
        for n, k, splits in LAYER_PHASES:
            rows.append((off, 0 if empty else n, k, min(splits, k // block_k)))
            off += n * k
    return rows


def time_graph(fn, reps: int) -> list[float]:
    """Sorted ms of `reps` replays of `fn` captured in one CUDA graph (after 3 warm-up calls)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--programs-per-sm", type=int, default=1)
    ap.add_argument("--block-n", type=int, default=64, help="weight rows per tile")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--skip-prefetch", action="store_true", help="leave out the L2-prefetch variants")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    programs = sms * args.programs_per_sm
    phases = _phases(args.layers, empty=False, block_k=args.block_k)
    n_weights = sum(n * k for _, n, k, _ in phases)
    w = torch.randn(n_weights, dtype=torch.bfloat16, device=dev) * 0.02
    x = torch.randn(BLOCK_M, max(k for _, _, k, _ in phases), dtype=torch.bfloat16, device=dev)
    out = torch.zeros(max(programs, 8192), args.block_n * BLOCK_M, dtype=torch.float32, device=dev)
    counters = torch.zeros(args.steps, dtype=torch.int32, device=dev)
    meta = {"BLOCK_N": args.block_n, "BLOCK_K": args.block_k, "BLOCK_M": BLOCK_M, "num_warps": args.warps,
            "num_stages": args.stages}

    def launches() -> None:
        for _ in range(args.steps):
            for off, n, k, splits in phases:
                phase_kernel[((n // args.block_n) * splits,)](w, x, out, off, n, k, splits, **meta)

    descs = [TensorDescriptor.from_tensor(w[off:off + n * k].view(n, k), [args.block_n, args.block_k])
             for off, n, k, _ in phases]

    def tma_launches() -> None:
        for _ in range(args.steps):
            for desc, (_, n, k, splits) in zip(descs, phases):
                tma_phase_kernel[((n // args.block_n) * splits,)](desc, x, out, k, splits, **meta)

    def persistent(table: torch.Tensor, barrier: bool, ahead: int = 0):
        def run() -> None:
            counters.zero_()
            for step in range(args.steps):
                persistent_kernel[(programs,)](w, x, out, table, counters[step:], len(phases), BARRIER=barrier,
                                               AHEAD=ahead, **meta)
        return run

    table = torch.tensor(phases, dtype=torch.int64, device=dev).flatten()
    empty_phases = _phases(args.layers, empty=True, block_k=args.block_k)
    empty = torch.tensor(empty_phases, dtype=torch.int64, device=dev).flatten()
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
              "programs": programs, "steps": args.steps, "layers": args.layers, "block_k": args.block_k,
              "stages": args.stages, "block_n": args.block_n, "warps": args.warps,
              "weight_bytes_per_step": 2 * n_weights, "phases_per_step": len(phases)}
    variants = [("launches", launches), ("tma_launches", tma_launches), ("persistent", persistent(table, True)),
                ("persistent_nobarrier", persistent(table, False)), ("barriers_only", persistent(empty, True))]
    if not args.skip_prefetch:
        variants += [("persistent_l2_ahead1", persistent(table, True, 1)),
                     ("persistent_l2_ahead2", persistent(table, True, 2)),
                     ("nobarrier_l2_ahead2", persistent(table, False, 2))]
    for name, fn in variants:
        t = time_graph(fn, args.reps)
        med = t[len(t) // 2]
        result[name] = {"median_ms": round(med, 4), "p90_ms": round(t[int(0.9 * (len(t) - 1))], 4),
                        "per_step_us": round(1000 * med / args.steps, 2),
                        "per_phase_us": round(1000 * med / args.steps / len(phases), 3),
                        "tb_per_s": round(2 * n_weights * args.steps / (med * 1e-3) / 1e12, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
