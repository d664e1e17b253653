"""Which part of the Gluon split attention costs the chain its time (attempt 44). Run 125 put the
attention first (leaving it out saves 0.88 ms of 3.49 with the weights L2-resident, 4.9 µs a layer,
against 1.3-1.5 µs for o_proj or the combine). This times the chain with a probe copy of
`kernels_gluon.attention_split_kernel` in its place, with one part at a time left out (the actions
are then wrong; only the time is used):

- `copy`: the copy as it is (should time as the engine's kernel);
- `no_q`: q not read (its shared tile left as it is);
- `early`: every K/V tile fetched before the wait, the suffix one too (stale suffix rows);
- `no_qk`, `no_pv`: the scores' or the output's wgmma left out;
- `no_store`: the partial outputs not stored (their maxima and sums still are);
- `share_kv`: a correct variant with K and V in one 32 KB tile (V fetched once the scores' wgmma has
  read K): 42 KB a program instead of 76, so that it fits beside a 164 KB qkv or gate_up program;
- `noop_<KB>`: a kernel that only waits (PDL) and holds <KB> KB of shared memory, on the same grid: what
  the attention's place in the chain costs apart from its work, and whether its shared memory (76 KB,
  which does not fit beside a qkv or gate_up program's 164 KB) is what costs.

The probe kernel is a copy of the engine's with the knobs added (the engine's stays free of them);
it times the same as the engine's (`copy` row), and is kept as the script of runs 126-127.

    PYTHONPATH=. python bench/attention_probe.py [--own-weights] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
)

from bench.chain_setup import bench_pi05_engine
from pi0_policy_ros.engine import kernels_gluon as G
from pi0_policy_ros.engine.bench import time_chain_variant
from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep

VARIANTS = {"copy": {}, "no_q": {"NO_Q": True}, "early": {"EARLY": True}, "no_qk": {"NO_QK": True},
            "no_pv": {"NO_PV": True}, "no_store": {"NO_STORE": True}, "share_kv": {"SHARE_KV": True}}


@gluon.jit
def probe_attention_kernel(k_desc, v_desc, q_ptr, bias_ptr, part_o_ptr, part_ml_ptr, R, NKEYS, PP, stride_bias, S,
                           scale, Q_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, PDL: gl.constexpr,
                           NO_Q: gl.constexpr, EARLY: gl.constexpr, NO_QK: gl.constexpr, NO_PV: gl.constexpr,
                           NO_STORE: gl.constexpr, SHARE_KV: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 256], k_desc.layout)
    if SHARE_KV:
        v_smem = k_smem
    else:
        v_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 256], v_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 256], Q_LAYOUT)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 64], P_LAYOUT)
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    split = gl.program_id(0)
    key0 = split * 64
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)
    gl.thread_barrier()
    prefix_only = (key0 + 64 <= PP) or EARLY
    if prefix_only:
        mbarrier.expect(bars.index(0), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [key0, 0], bars.index(0), k_smem)
        if not SHARE_KV:
            mbarrier.expect(bars.index(1), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [key0, 0], bars.index(1), v_smem)
    keys_m = key0 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
    r_m = gl.program_id(1) * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    tok_m = gl.minimum(r_m // 8, S - 1)
    b = gl.load(bias_ptr + tok_m[None, :] * stride_bias + keys_m[:, None], mask=(keys_m < NKEYS)[:, None],
                other=float("-inf"))
    G._pdl_enter(PDL)
    if not prefix_only:
        mbarrier.expect(bars.index(0), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [key0, 0], bars.index(0), k_smem)
        if not SHARE_KV:
            mbarrier.expect(bars.index(1), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [key0, 0], bars.index(1), v_smem)
    if not NO_Q:
        r = gl.program_id(1) * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, bl))
        d = gl.arange(0, 256, layout=gl.SliceLayout(0, bl))
        tok = gl.minimum(r // 8, S - 1)
        q_smem.store(gl.load(q_ptr + tok[:, None] * 2048 + (r % 8)[:, None] * 256 + d[None, :],
                             mask=(r < R)[:, None], other=0.0))
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.wait(bars.index(0), 0)
    st = gl.zeros([64, 16], gl.float32, layout=mma)
    if not NO_QK:
        st = warpgroup_mma(k_smem, q_smem.permute((1, 0)), st)
    if SHARE_KV:  # V into K's tile once the scores' wgmma (synchronous) has read it
        gl.thread_barrier()
        mbarrier.expect(bars.index(1), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [key0, 0], bars.index(1), v_smem)
    m, l = G._softmax_to_smem(st, b, scale, p_smem)
    mbarrier.wait(bars.index(1), 0)
    ot = gl.zeros([256, 16], gl.float32, layout=mma)
    if not NO_PV:
        ot = warpgroup_mma(v_smem.permute((1, 0)), p_smem.permute((1, 0)), ot)
    if NO_STORE:
        G._store_partial(part_o_ptr, part_ml_ptr, ot, m, l, split, r_m, 0, mma)  # R = 0: every row masked
        rmask = r_m < R
        gl.store(part_ml_ptr + split * 2 * R + r_m, m + gl.sum(ot, axis=0), mask=rmask)
        gl.store(part_ml_ptr + (split * 2 + 1) * R + r_m, l, mask=rmask)
    else:
        G._store_partial(part_o_ptr, part_ml_ptr, ot, m, l, split, r_m, R, mma)
    mbarrier.invalidate(bars.index(0))
    mbarrier.invalidate(bars.index(1))


@gluon.jit
def noop_kernel(part_ml_ptr, R, A_KB: gl.constexpr, B_KB: gl.constexpr, PDL: gl.constexpr):
    """Waits for the previous kernel and lets the next one launch; holds A_KB + B_KB of shared memory
    (two power-of-two blocks, kept: read back and stored where R < 0, which the compiler cannot rule
    out)."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    a = gl.allocate_shared_memory(gl.int32, [A_KB * 256], plain)
    b = gl.allocate_shared_memory(gl.int32, [B_KB * 256], plain)
    G._pdl_enter(PDL)
    idx = gl.arange(0, 128, layout=lay)
    a.slice(0, 128).store(idx)
    b.slice(0, 128).store(idx)
    gl.thread_barrier()
    if R < 0:
        gl.store(part_ml_ptr + idx, (a.slice(0, 128).load(lay) + b.slice(0, 128).load(lay)).to(gl.float32))


class _Noop:
    """`noop_kernel` on the attention's grid, with the attention's PDL mode."""

    def __init__(self, a_kb: int, b_kb: int) -> None:
        self.kb = (a_kb, b_kb)

    def __getitem__(self, grid):
        def launch(k_desc, v_desc, q, bias, part_o, part_ml, R, *args, PDL, num_warps, launch_pdl, **kwargs):
            noop_kernel[grid](part_ml, R, A_KB=self.kb[0], B_KB=self.kb[1], PDL=PDL, num_warps=num_warps,
                              launch_pdl=launch_pdl)
        return launch


class _WithKnobs:
    """`probe_attention_kernel` launched where the engine launches its attention, with `knobs` added."""

    def __init__(self, knobs: dict) -> None:
        self.knobs = {"NO_Q": False, "EARLY": False, "NO_QK": False, "NO_PV": False, "NO_STORE": False, "SHARE_KV": False,
                      **knobs}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: probe_attention_kernel[grid](*args, **kwargs, **self.knobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--own-weights", action="store_true", help="each layer its own weights (default: layer 0's)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    engine = bench_pi05_engine()
    ew = engine.expert_weights
    weights = ew if args.own_weights else dataclasses.replace(ew, layers=[ew.layers[0]] * len(ew.layers))
    engine_kernel = G.attention_split_kernel
    rows = []
    reference = None
    noops = {f"noop_{a + b}": _Noop(a, b) for a, b in ((1, 1), (32, 8), (64, 8), (64, 16), (128, 16))}
    for name in ("engine", *VARIANTS, *noops, "engine"):
        G.attention_split_kernel = (engine_kernel if name == "engine" else noops[name] if name in noops
                                    else _WithKnobs(VARIANTS[name]))
        try:
            step = TritonDenoiseStep(weights, engine.tables, engine.shape, engine.buf)
            timing = time_chain_variant(engine, step, iterations=args.iterations)
        finally:
            G.attention_split_kernel = engine_kernel
        if reference is None:
            reference = timing.actions
        row = {"attention": name, "weights": "own" if args.own_weights else "layer 0's",
               "chain_ms": round(timing.chain_ms["median"], 3), "p90": round(timing.chain_ms["p90"], 3),
               "max_abs_diff_vs_engine": float(abs(timing.actions - reference).max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
