"""pi0.5's eighteen expert layers of one denoise step as one persistent kernel (Gluon, sm_90).

A program per SM. In each program one warp only streams weight tiles (TMA) into a ring of
shared-memory slots, in the order the program will multiply them, across every phase of every
layer, and never waits for the other programs: the weight stream runs on through the grid-wide
barriers (`bench/persistent_ws_micro.py`: 2.8 TB/s). The 4 MMA warps run each layer's six phases,
a barrier after each: qkv (RMSNorm × (1 + scale) as the activations are loaded, RoPE, K/V into
the cache), split-KV attention, its combine, o_proj (gated residual by float32 atomics), gate_up
(norm, GEGLU), down (gated residual). Activations cross SMs through L2 only: each program's
writes, a gpu-scope fence, the CTA barrier, then one release arrival; readers acquire first.
action_in before and the final norm + head after stay the Triton kernels (`TritonDenoiseStep`).

Needs every program resident at once (one per SM; nothing else on the GPU), a unit of every phase
per SM (≥ 128 SMs: the H100 SXM and H200 have 132) and the full-size pi0.5 expert (width 1024, 8
query heads and 1 KV head of 256, mlp 4096) with ≤ 16 suffix tokens; `GluonDenoiseStep.supports`
says whether a geometry fits. Weights are re-laid out once as
[64, 256] tiles in consumption order (qkv tiles hold a head's two RoPE halves, gate_up tiles a
gate and its up): 0.6 GB more GPU memory.

Status: correct (`test/gpu/test_denoise_gluon_gpu.py`), but slower than the Triton chain on the
H100 (7.8 against 5.7 ms for ten steps, `bench/engine_notes.md` attempt 26: the gpu-scope release
of every barrier stalls the weight stream), so the engine does not use it; the bench times it as
the `gluon persistent` variant and `bench/gluon_step_profile.py` shows where each phase's time goes.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from pi0_policy_ros.engine import kernels_triton as K
from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.denoise_triton import TritonDenoiseStep
from pi0_policy_ros.engine.kernels_gluon import (_gelu_tanh, _halves, _load_rows, _normed_rows_to_smem, _residual_add,
                                                 _softmax_to_smem, _store_partial)
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.engine.weights import ExpertWeights

WIDTH, HEAD_DIM, Q_HEADS, MLP = 1024, 256, 8, 4096
TILE_N, TILE_K, TOKENS = 64, 256, 16  # weight tile rows × K; suffix tokens padded to 16 (the MMA's N)
RING_SLOTS = 5  # × 32 KB; with the activation, P and scratch tiles: 211 KB of shared memory (sm_90: 227)
QKV_UNITS, QKV_KT = (Q_HEADS + 2) * HEAD_DIM // 2 // 32, WIDTH // TILE_K  # 40 units of 32 RoPE pairs
OUT_UNITS, OUT_KT = WIDTH // TILE_N * Q_HEADS, HEAD_DIM // TILE_K  # 16 row blocks × 8 heads (K split)
GU_UNITS, GU_KT = MLP // 32, WIDTH // TILE_K  # 32 (gate, up) pairs each
DOWN_SPLITS = 8
DOWN_UNITS, DOWN_KT = WIDTH // TILE_N * DOWN_SPLITS, MLP // DOWN_SPLITS // TILE_K
TILES_PER_LAYER = QKV_UNITS * QKV_KT + OUT_UNITS * OUT_KT + GU_UNITS * GU_KT + DOWN_UNITS * DOWN_KT
PHASES_PER_LAYER = 6
# the kernels spell these out (unit counts, first tile of each matrix in a layer: 0, 160, 288, 800)
assert (QKV_UNITS, OUT_UNITS, GU_UNITS, DOWN_UNITS, TILES_PER_LAYER) == (40, 128, 128, 128, 1056)


# ---- device helpers ------------------------------------------------------------------------------
@gluon.jit
def _clock():
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _grid_sync(cnt_ptr, target, tim_ptr, TIMING: gl.constexpr):
    """All programs' writes so far are visible to all once `target` arrivals are counted.
    TIMING: this program's SM clock when it arrives and when it leaves, at tim_ptr[2k], [2k + 1]
    for barrier k = target / programs (a diagnostic: `bench/gluon_step_profile.py`)."""
    if TIMING:
        k = target // gl.num_programs(0)
        gl.store(tim_ptr + 2 * k, _clock())
    gl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)
    gl.thread_barrier()
    gl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    seen = gl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = gl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    gl.thread_barrier()
    if TIMING:
        gl.store(tim_ptr + 2 * k + 1, _clock())


@gluon.jit
def _rows_to_smem(src_ptr, row_stride, col0, x_smem, S, CHUNKS: gl.constexpr, BL: gl.constexpr):
    """x_smem[:, :256·CHUNKS] ← the bf16 activations src[t, col0 : col0 + 256·CHUNKS] (1 or 2 chunks)."""
    x0 = _load_rows(src_ptr, row_stride, col0, S, BL)
    if CHUNKS == 2:
        x1 = _load_rows(src_ptr, row_stride, col0 + 256, S, BL)
        x_smem.slice(256, 256, dim=1).store(x1)
    x_smem.slice(0, 256, dim=1).store(x0)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _multiply_tiles(ring, ready, empty, x_smem, i, KT: gl.constexpr, MMA: gl.constexpr):
    """acc[64 weight rows, 16 tokens] = Σ_j tile_j · x_smem[:, 256j : 256(j + 1)]ᵀ over the next KT
    ring tiles (the weight tile is the MMA's M side: "swap AB")."""
    num_slots: gl.constexpr = ring.type.shape[0]
    acc = gl.zeros([64, 16], gl.float32, layout=MMA)
    for j in gl.static_range(KT):
        slot = i % num_slots
        mbarrier.wait(ready.index(slot), (i // num_slots) & 1)
        acc = warpgroup_mma(ring.index(slot), x_smem.slice(j * 256, 256, dim=1).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index(slot), count=1)
        i += 1
    return acc, i


@gluon.jit
def _normed_pair_unit(ring, ready, empty, x_smem, scratch, i, resid_ptr, mul_ptr, b_lo, b_hi, S, eps, tim_ptr,
                      stamp, BL: gl.constexpr, BLT: gl.constexpr, MMA: gl.constexpr, TIMING: gl.constexpr):
    """qkv's and gate_up's unit: RMSNorm(resid) × mul → 4 ring tiles → the two 32-row halves
    (RoPE lo / hi, or gate / up) with the norm's row scale and their biases. TIMING: SM clocks
    after the norm and after the MMAs at tim_ptr[stamp], [stamp + 1]."""
    ss = _normed_rows_to_smem(resid_ptr, mul_ptr, x_smem, S, BL)
    if TIMING:
        gl.store(tim_ptr + stamp, _clock())
    inv = gl.convert_layout(1.0 / gl.sqrt(ss / 1024 + eps), gl.SliceLayout(0, BLT))
    acc, i = _multiply_tiles(ring, ready, empty, x_smem, i, 4, MMA)
    if TIMING:
        gl.store(tim_ptr + stamp + 1, _clock())
    lo, hi = _halves(acc, scratch, BLT)
    return lo * inv[None, :] + b_lo[:, None], hi * inv[None, :] + b_hi[:, None], i


# ---- the phases: one unit per program (programs ≥ units); what no other program writes is
# ---- loaded before the phase's barrier, the rest in one round trip after it
@gluon.jit
def _qkv_phase(ring, ready, empty, x_smem, scratch, i, pid, layer, n_layers, resid_ptr, mul_ptr, bias_ptr, q_ptr,
               keys_ptr, values_ptr, cos_ptr, sin_ptr, cnt_ptr, target, tim_ptr, S, P, PP, eps,
               BL: gl.constexpr, BLT: gl.constexpr, MMA: gl.constexpr, TIMING: gl.constexpr = False):
    """40 units of 32 RoPE pairs: head = pid // 4 (8 q heads, then k, then v)."""
    valid = pid < 40
    head = pid // 4
    cin = (pid % 4) * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, BLT))
    col = head * 256 + cin
    t = gl.arange(0, 16, layout=gl.SliceLayout(0, BLT))
    tmask = (t < S)[None, :]
    cmask = (cin < 256) & valid
    b_lo = gl.load(bias_ptr + col, mask=cmask, other=0.0)
    b_hi = gl.load(bias_ptr + col + 128, mask=cmask, other=0.0)
    trig = t[None, :] * 256 + cin[:, None]
    c_lo = gl.load(cos_ptr + trig, mask=tmask, other=0.0).to(gl.float32)
    c_hi = gl.load(cos_ptr + trig + 128, mask=tmask, other=0.0).to(gl.float32)
    s_lo = gl.load(sin_ptr + trig, mask=tmask, other=0.0).to(gl.float32)
    s_hi = gl.load(sin_ptr + trig + 128, mask=tmask, other=0.0).to(gl.float32)
    if layer > 0:  # the previous layer's down projection has finished the residual
        _grid_sync(cnt_ptr, target, tim_ptr, TIMING)
    if valid:
        lo, hi, i = _normed_pair_unit(ring, ready, empty, x_smem, scratch, i, resid_ptr, mul_ptr, b_lo, b_hi, S, eps,
                                      tim_ptr, 12 * n_layers + 2 + 4 * layer, BL, BLT, MMA, TIMING)
        if head <= 8:  # the q heads and the k head are rotated; v is not
            lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
        if head < 8:
            dst = q_ptr + t[None, :] * 2048 + col[:, None]
        elif head == 8:
            dst = keys_ptr + (layer * P + PP + t[None, :]) * 256 + cin[:, None]
        else:
            dst = values_ptr + (layer * P + PP + t[None, :]) * 256 + cin[:, None]
        gl.store(dst, lo.to(gl.bfloat16), mask=tmask)
        gl.store(dst + 128, hi.to(gl.bfloat16), mask=tmask)
    return i


@gluon.jit
def _attention_phase(x_smem, p_smem, pid, layer, q_ptr, keys_ptr, values_ptr, bias_ptr,
                     part_o_ptr, part_ml_ptr, cnt_ptr, target, tim_ptr, S, P, PP, NKEYS, stride_bias, scale, n_splits,
                     BL: gl.constexpr, MMA: gl.constexpr, TIMING: gl.constexpr = False):
    """Split-KV attention over the one KV head: unit = (64-key split, 16 query rows); query row
    r = token·8 + head. Unnormalised outputs and (max, sum) per split, as `attention_split`.
    K and Vᵀ are the MMAs' register operands (no shared memory: the ring gets it); the prefix's K
    rows are the same for all steps and are loaded before the barrier."""
    kv_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    R = S * 8
    row_blocks = (R + 15) // 16
    valid = pid < n_splits * row_blocks
    split = pid // row_blocks
    rb = pid % row_blocks
    d = gl.arange(0, 256, layout=gl.SliceLayout(0, BL))
    keys = split * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, BL))
    kv = (layer * P + keys)[:, None] * 256 + d[None, :]
    kmask = (keys < NKEYS)[:, None]
    keys_m = split * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
    r_m = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, MMA))
    tok_m = gl.minimum(r_m // 8, S - 1)
    b = gl.load(bias_ptr + tok_m[None, :] * stride_bias + keys_m[:, None], mask=(keys_m < NKEYS)[:, None] & valid,
                other=float("-inf"))
    prefix_rows = (keys < PP)[:, None]
    k = gl.load(keys_ptr + kv, mask=prefix_rows & valid, other=0.0)
    _grid_sync(cnt_ptr, target, tim_ptr, TIMING)
    if valid:
        r = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, BL))
        tok = gl.minimum(r // 8, S - 1)
        q = gl.load(q_ptr + tok[:, None] * 2048 + (r % 8)[:, None] * 256 + d[None, :], mask=(r < R)[:, None],
                    other=0.0)
        if (split + 1) * 64 > PP:  # this split holds the suffix keys the qkv phase just wrote
            k = gl.where(prefix_rows, k, gl.load(keys_ptr + kv, mask=kmask & (keys >= PP)[:, None], other=0.0))
        v = gl.load(values_ptr + kv, mask=kmask, other=0.0)
        x_smem.slice(0, 256, dim=1).store(q)
        fence_async_shared()
        gl.thread_barrier()
        s = warpgroup_mma(gl.convert_layout(k, kv_dot), x_smem.slice(0, 256, dim=1).permute((1, 0)),
                          gl.zeros([64, 16], gl.float32, layout=MMA))  # scoresᵀ [64 keys, 16 rows]
        m, l = _softmax_to_smem(s, b, scale, p_smem)
        o = warpgroup_mma(gl.convert_layout(gl.permute(v, (1, 0)), kv_dot), p_smem.permute((1, 0)),
                          gl.zeros([256, 16], gl.float32, layout=MMA))  # outputᵀ [256 dims, 16 rows] = Vᵀ·Pᵀ
        _store_partial(part_o_ptr, part_ml_ptr, o, m, l, split, r_m, R, MMA)


@gluon.jit
def _combine_phase(pid, part_o_ptr, part_ml_ptr, attn_ptr, cnt_ptr, target, tim_ptr, S, n_splits, L3: gl.constexpr,
                   TIMING: gl.constexpr = False):
    """attn[row, d] from every split's partials (as `_combine_rows`); unit = (16 rows, 32 dims)."""
    _grid_sync(cnt_ptr, target, tim_ptr, TIMING)
    R = S * 8
    if pid < (R + 15) // 16 * 8:
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        LO: gl.constexpr = gl.SliceLayout(0, L3)
        rb = pid // 8
        d0 = (pid % 8) * 32
        sp = gl.arange(0, 16, layout=gl.SliceLayout(1, L2))
        r = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, L2))
        ml_mask = (sp[:, None] < n_splits) & (r < R)[None, :]
        sp3 = gl.expand_dims(gl.expand_dims(sp, 1), 2)
        r3 = gl.expand_dims(gl.expand_dims(r, 0), 2)
        d3 = gl.expand_dims(gl.expand_dims(d0 + gl.arange(0, 32, layout=gl.SliceLayout(0, LO)), 0), 0)
        m = gl.load(part_ml_ptr + (sp[:, None] * 2) * R + r[None, :], mask=ml_mask, other=float("-inf"))
        l = gl.load(part_ml_ptr + (sp[:, None] * 2 + 1) * R + r[None, :], mask=ml_mask, other=0.0)
        o = gl.load(part_o_ptr + (sp3 * R + r3) * 256 + d3, mask=gl.expand_dims(ml_mask, 2), other=0.0)
        m_tot = gl.where(r < R, gl.max(m, axis=0), 0.0)
        w = gl.exp(m - m_tot[None, :])
        denom = gl.where(r < R, gl.sum(w * l, axis=0), 1.0)
        out = gl.sum(gl.expand_dims(w, 2) * o, axis=0) / gl.convert_layout(denom, gl.SliceLayout(1, LO))[:, None]
        r_o = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, LO))
        d_o = d0 + gl.arange(0, 32, layout=gl.SliceLayout(0, LO))
        gl.store(attn_ptr + r_o[:, None] * 256 + d_o[None, :], out.to(gl.bfloat16), mask=(r_o < R)[:, None])


@gluon.jit
def _residual_phase(ring, ready, empty, x_smem, i, pid, src_ptr, src_stride, resid_ptr, gate_ptr, cnt_ptr, target,
                    tim_ptr, S, KT: gl.constexpr, BL: gl.constexpr, MMA: gl.constexpr, TIMING: gl.constexpr = False):
    """o_proj (src = attention output, KT = 1: one head per unit) or down (src = GEGLU activations,
    KT = 2): 128 units of 64 output rows (pid // 8) × an eighth of the input columns (pid % 8),
    added to the residual with its gate."""
    valid = pid < 128
    gate = gl.load(gate_ptr + (pid // 8) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA)), mask=valid,
                   other=0.0)
    _grid_sync(cnt_ptr, target, tim_ptr, TIMING)
    if valid:
        _rows_to_smem(src_ptr, src_stride, (pid % 8) * 256 * KT, x_smem, S, KT, BL)
        acc, i = _multiply_tiles(ring, ready, empty, x_smem, i, KT, MMA)
        _residual_add(resid_ptr, gate, acc, (pid // 8) * 64, S, MMA)
    return i


@gluon.jit
def _gate_up_phase(ring, ready, empty, x_smem, scratch, i, pid, layer, n_layers, resid_ptr, mul_ptr, bias_ptr,
                   act_ptr, cnt_ptr, target, tim_ptr, S, eps, BL: gl.constexpr, BLT: gl.constexpr, MMA: gl.constexpr,
                   TIMING: gl.constexpr = False):
    """128 units of 32 (gate, up) column pairs."""
    valid = pid < 128
    col = pid * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, BLT))
    t = gl.arange(0, 16, layout=gl.SliceLayout(0, BLT))
    b_gate = gl.load(bias_ptr + col, mask=(col < 4096) & valid, other=0.0)
    b_up = gl.load(bias_ptr + 4096 + col, mask=(col < 4096) & valid, other=0.0)
    _grid_sync(cnt_ptr, target, tim_ptr, TIMING)
    if valid:
        gate, up, i = _normed_pair_unit(ring, ready, empty, x_smem, scratch, i, resid_ptr, mul_ptr, b_gate, b_up, S,
                                        eps, tim_ptr, 12 * n_layers + 4 + 4 * layer, BL, BLT, MMA, TIMING)
        act = _gelu_tanh(gate) * up
        gl.store(act_ptr + t[None, :] * 4096 + col[:, None], act.to(gl.bfloat16), mask=(t < S)[None, :])
    return i


# ---- partitions ----------------------------------------------------------------------------------
@gluon.jit
def _stream_unit(w_desc, ring, ready, empty, i, first_tile, KT: gl.constexpr):
    num_slots: gl.constexpr = ring.type.shape[0]
    for j in gl.static_range(KT):
        slot = i % num_slots
        mbarrier.wait(empty.index(slot), ((i // num_slots) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [(first_tile + j) * 64, 0], ready.index(slot), ring.index(slot))
        i += 1
    return i


@gluon.jit
def _weight_stream(w_desc, ring, ready, empty, n_layers, pid, g):
    """The producer warp: this program's weight tiles, layer after layer, as the ring frees up
    (tile order of `tile_expert`: qkv 40 × 4, o_proj 128 × 1, gate_up 128 × 4, down 128 × 2)."""
    i = 0
    for layer in range(n_layers):
        base = layer * 1056
        if pid < 40:
            i = _stream_unit(w_desc, ring, ready, empty, i, base + pid * 4, 4)
        if pid < 128:
            i = _stream_unit(w_desc, ring, ready, empty, i, base + 160 + pid, 1)
            i = _stream_unit(w_desc, ring, ready, empty, i, base + 288 + pid * 4, 4)
            i = _stream_unit(w_desc, ring, ready, empty, i, base + 800 + pid * 2, 2)


@gluon.jit
def _layers(ring, ready, empty, x_smem, p_smem, scratch, pid, g, n_layers, step,
            resid_ptr, q_ptr, attn_ptr, act_ptr, keys_ptr, values_ptr, cos_ptr, sin_ptr, bias_ptr,
            part_o_ptr, part_ml_ptr, mul_ptr, gate_ptr, qkv_bias_ptr, gu_bias_ptr, cnt_ptr,
            S, P, PP, NKEYS, n_splits, stride_bias, scale, eps, tim_ptr,
            BL: gl.constexpr, BLT: gl.constexpr, L3: gl.constexpr, MMA: gl.constexpr, TIMING: gl.constexpr):
    """The MMA warps: each layer's six phases; barrier k (counted from 1) opens at k·g arrivals."""
    tim_ptr = tim_ptr + pid * (16 * n_layers + 2)
    i = 0
    for layer in range(n_layers):
        row = step * n_layers + layer
        mul0 = mul_ptr + (row * 2) * 1024
        gate0 = gate_ptr + (row * 2) * 1024
        k = layer * 6
        i = _qkv_phase(ring, ready, empty, x_smem, scratch, i, pid, layer, n_layers, resid_ptr, mul0,
                       qkv_bias_ptr + row * 2560, q_ptr, keys_ptr, values_ptr, cos_ptr, sin_ptr, cnt_ptr, k * g,
                       tim_ptr, S, P, PP, eps, BL, BLT, MMA, TIMING)
        _attention_phase(x_smem, p_smem, pid, layer, q_ptr, keys_ptr, values_ptr, bias_ptr,
                         part_o_ptr, part_ml_ptr, cnt_ptr, (k + 1) * g, tim_ptr, S, P, PP, NKEYS, stride_bias,
                         scale, n_splits, BL, MMA, TIMING)
        _combine_phase(pid, part_o_ptr, part_ml_ptr, attn_ptr, cnt_ptr, (k + 2) * g, tim_ptr, S, n_splits, L3, TIMING)
        i = _residual_phase(ring, ready, empty, x_smem, i, pid, attn_ptr, 2048, resid_ptr, gate0, cnt_ptr,
                            (k + 3) * g, tim_ptr, S, 1, BL, MMA, TIMING)
        i = _gate_up_phase(ring, ready, empty, x_smem, scratch, i, pid, layer, n_layers, resid_ptr, mul0 + 1024,
                           gu_bias_ptr + row * 8192, act_ptr, cnt_ptr, (k + 4) * g, tim_ptr, S, eps, BL, BLT, MMA,
                           TIMING)
        i = _residual_phase(ring, ready, empty, x_smem, i, pid, act_ptr, 4096, resid_ptr, gate0 + 1024, cnt_ptr,
                            (k + 5) * g, tim_ptr, S, 2, BL, MMA, TIMING)
    if TIMING:  # the end of the last phase
        gl.store(tim_ptr + 2 * 6 * n_layers, _clock())


@gluon.jit
def expert_step_kernel(w_desc, resid_ptr, q_ptr, attn_ptr, act_ptr, keys_ptr, values_ptr, cos_ptr, sin_ptr,
                       bias_ptr, part_o_ptr, part_ml_ptr, mul_ptr, gate_ptr, qkv_bias_ptr, gu_bias_ptr, cnt_ptr,
                       n_layers, step, S, P, PP, NKEYS, n_splits, stride_bias, scale, eps, tim_ptr,
                       X_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr,
                       NUM_SLOTS: gl.constexpr, TIMING: gl.constexpr = False):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    blt: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])
    l3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [1, 4, 1], [2, 1, 0])
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    ring = gl.allocate_shared_memory(w_desc.dtype, [NUM_SLOTS, 64, 256], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_SLOTS, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_SLOTS):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 1024], X_LAYOUT)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [16, 64], P_LAYOUT)
    scratch = gl.allocate_shared_memory(gl.float32, [64, 16], plain)
    pid = gl.program_id(0)
    g = gl.num_programs(0)
    gl.warp_specialize([
        (_layers, (ring, ready, empty, x_smem, p_smem, scratch, pid, g, n_layers, step,
                   resid_ptr, q_ptr, attn_ptr, act_ptr, keys_ptr, values_ptr, cos_ptr, sin_ptr, bias_ptr,
                   part_o_ptr, part_ml_ptr, mul_ptr, gate_ptr, qkv_bias_ptr, gu_bias_ptr, cnt_ptr,
                   S, P, PP, NKEYS, n_splits, stride_bias, scale, eps, tim_ptr, bl, blt, l3, mma, TIMING)),
        (_weight_stream, (w_desc, ring, ready, empty, n_layers, pid, g)),
    ], [1], [24])


# ---- host side -----------------------------------------------------------------------------------
def tile_expert(weights: ExpertWeights) -> torch.Tensor:
    """Every layer's four matrices as [64, 256] tiles in the order the kernel multiplies them:
    [layers · 1056 · 64, 256] bf16."""
    dev = weights.layers[0].qkv.weight.device
    pair = torch.arange(32, device=dev)
    tiles = []
    for lw in weights.layers:
        units = torch.arange(QKV_UNITS, device=dev)
        lo = (units // 4 * HEAD_DIM + units % 4 * 32)[:, None] + pair[None, :]
        rows = torch.cat([lo, lo + HEAD_DIM // 2], 1)  # [40, 64]: a head's RoPE halves
        qkv = lw.qkv.weight[rows.flatten()].view(QKV_UNITS, 64, QKV_KT, TILE_K).transpose(1, 2)
        out = lw.out.weight.view(WIDTH // 64, 64, Q_HEADS, TILE_K).transpose(1, 2)
        gates = (torch.arange(GU_UNITS, device=dev) * 32)[:, None] + pair[None, :]
        rows = torch.cat([gates, gates + MLP], 1)  # [128, 64]: gate rows, then their up rows
        gate_up = lw.gate_up.weight[rows.flatten()].view(GU_UNITS, 64, GU_KT, TILE_K).transpose(1, 2)
        down = lw.down.weight.view(WIDTH // 64, 64, DOWN_SPLITS, DOWN_KT, TILE_K).permute(0, 2, 3, 1, 4)
        for t in (qkv, out, gate_up, down):
            tiles.append(t.reshape(-1, TILE_K))
    tiles = torch.cat(tiles).contiguous()
    assert tiles.shape[0] == len(weights.layers) * TILES_PER_LAYER * TILE_N
    return tiles


class GluonDenoiseStep:
    """pi0.5's step: action_in (Triton) → `expert_step_kernel` → final norm + head (Triton).
    Shares `plain`'s buffers (residual, q, attention partials, activations)."""

    def __init__(self, plain: TritonDenoiseStep) -> None:
        self.plain = plain
        w, shape = plain.w, plain.shape
        if not self.supports(w, shape):
            raise ValueError("the Gluon step needs the full-size pi0.5 expert and ≤ 16 suffix tokens")
        dev = plain.resid.device
        self.programs = torch.cuda.get_device_properties(dev).multi_processor_count
        row_blocks = -(-shape.suffix_len * Q_HEADS // 16)
        units = max(OUT_UNITS, plain.n_splits * row_blocks)
        if self.programs < units:
            raise ValueError(f"the Gluon step runs one unit per SM: needs ≥ {units} SMs, found {self.programs}")
        self.tiles = tile_expert(w)
        layout = gl.NVMMASharedLayout.get_default_for([TILE_N, TILE_K], gl.bfloat16)
        self.w_desc = TensorDescriptor(self.tiles, list(self.tiles.shape), list(self.tiles.stride()), [TILE_N, TILE_K],
                                       layout)
        self.layouts = {"X_LAYOUT": gl.NVMMASharedLayout.get_default_for([16, 1024], gl.bfloat16),
                        "P_LAYOUT": gl.NVMMASharedLayout.get_default_for([16, 64], gl.bfloat16)}
        self.counters = torch.zeros(shape.num_steps, dtype=torch.int32, device=dev)
        # TIMING builds only (`bench/gluon_step_profile.py`): int64 [programs, 16 · layers + 2] SM clocks
        self.timing: torch.Tensor | None = None

    @staticmethod
    def supports(weights: ExpertWeights, shape: EngineShape) -> bool:
        ec = weights.cfg
        return (shape.pi05 and shape.suffix_len <= TOKENS and ec.width == WIDTH and ec.head_dim == HEAD_DIM
                and ec.num_heads == Q_HEADS and ec.num_kv_heads == 1 and ec.mlp_dim == MLP
                and weights.layers[0].qkv.weight.dtype == torch.bfloat16)

    def run(self, buf: DeviceBuffers, step: int) -> None:
        p, tab, shape = self.plain, self.plain.tables, self.plain.shape
        p._splitk(buf.x[step], p.w.action_in.weight, p.resid, K.EPI_STORE, bias=p.w.action_in.bias)
        self.counters[step].zero_()
        keys = buf.keys
        expert_step_kernel[(self.programs,)](
            self.w_desc, p.resid, p.q, p.attn, p.act, keys, buf.values, buf.suffix_cos, buf.suffix_sin,
            buf.suffix_bias, p.part_o, p.part_ml, tab.norm_mul, tab.gate, tab.qkv_bias, tab.gate_up_bias,
            self.counters[step:], len(p.w.layers), step, shape.suffix_len, keys.shape[1], shape.padded_prefix_len,
            keys.shape[1], p.n_splits, buf.suffix_bias.stride(0), HEAD_DIM**-0.5, p.w.cfg.rms_norm_eps,
            self.counters if self.timing is None else self.timing, NUM_SLOTS=RING_SLOTS,
            TIMING=self.timing is not None, num_warps=4, **self.layouts)
        p._head(buf, step)
