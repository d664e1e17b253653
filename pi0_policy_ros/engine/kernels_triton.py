"""Triton kernels for the denoise step (skinny M ≤ 64 rows, bandwidth bound), and the row kernels and
FP8 down projection of vision and prefix (`rowops`).

Imported only when used, by `denoise_triton` and `rowops` (never at package import), so the CPU CI
never needs Triton.

- `norm_linear_pair`: RMSNorm (×(1 + scale)) in the prologue, two column sets per program:
  RoPE pairs (d, d + hd/2) of each head for the fused QKV — writing q to a buffer and the suffix
  K/V straight into the static cache — or (gate, up) columns for GEGLU.
- `linear_splitk`: x·Wᵀ with K split over programs; epilogues: store (+ bias), SiLU, or
  `out += gate ⊙ (x·Wᵀ)` by float32 atomics (the residual stream).
- `norm_head`: final norm → float32 output projection (dt folded) → x_next = x + W'h + b'.
- `attention_split` + `attention_combine`: flash-decoding over the one KV head; the query rows
  are (token, head) pairs, so all heads share each K/V tile.
- `fp8_linear_residual`: the FP8 prefix's down projection with the residual add in its epilogue.

Split-K / split-KV variants with a last-arriver epilogue (`norm_linear_pair_splitk`,
`attention_fused`, `norm_head_splitk`): every program stores its partial result to a float32
workspace slot of its own, then counts itself in on a per-output-block int32 counter; the program
that sees count = splits - 1 is the last one, sums the slots in a fixed order (deterministic) and
runs the epilogue, then puts the counter back to 0. No spinning (no co-residency assumption), no
host work, and the state is all zeros again after every launch, so CUDA-graph replays are safe.
Memory ordering follows CUTLASS's split-K semaphore: stores → per-thread gpu fence → CTA barrier →
one acq_rel atomic; reader: that atomic (Triton broadcasts its result through shared memory with a
barrier) → loads that bypass L1 (`.cg`). See `_arrive`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

EPI_STORE, EPI_SILU, EPI_RESIDUAL = 0, 1, 2
EPI_ROPE, EPI_GEGLU = 0, 1


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))


@triton.jit
def _inv_rms(x_ptr, stride_xm, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    return 1.0 / tl.sqrt(acc / K + eps)


@triton.jit
def _arrive(cnt_ptr, FENCE: tl.constexpr):
    """Count this program in at `cnt_ptr` (int32); returns the count before it, so the last of n
    programs sees n - 1. Call after storing this program's partial results.

    Why the reader sees every partial: each thread's stores precede its `fence.acq_rel.gpu`
    (FENCE; the interpreter has no inline asm and runs programs one by one), the CTA barrier
    orders all threads before the single acq_rel atomic (release, gpu scope, cumulative through
    the barrier), and the last program's atomic is an acquire that Triton follows with a barrier
    when it broadcasts the scalar result; its loads then use `.cg` (L2, never a stale L1 line).
    Either half of the writer side should do on its own (a fence in every thread is the CUDA
    threadFenceReduction sample, barrier + one release is CUTLASS's semaphore); sm_90 SASS:
    MEMBAR.ALL.GPU in every thread, BAR.SYNC, then one thread's MEMBAR + ATOMG + CCTL.IVALL."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """Programmatic dependent launch (sm_90+, launched with `launch_pdl=True`): wait until the
    previous kernel in the stream has finished and its writes are visible, then let the next
    kernel's programs be scheduled, so they are resident and waiting when this one ends: the
    launch gap between the step's ~110 small dependent kernels overlaps with their work. Every
    kernel launched that way must call this before touching memory (the ordering is transitive
    only through the waits). PDL 2 (`TritonConfig.pdl_early`): the next kernel may launch first, while
    this one still waits; still nothing is read or written before the wait, and the wait returns only
    once the previous kernel has finished, which itself passed its own wait."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _pair_columns(p0, pair_offset, EPI: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The two column sets of pair block p0: RoPE halves (d, d + hd/2) of one head, or (gate, up)."""
    rn = tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = HD // 2
    if EPI == 0:
        head = p0 // HALF
        cin = p0 % HALF + rn  # column inside the head's first half
        col_lo = head * HD + cin
        col_hi = col_lo + HALF
    else:
        head = p0 * 0
        cin = rn
        col_lo = p0 + rn
        col_hi = col_lo + pair_offset
    return head, cin, col_lo, col_hi


@triton.jit
def _pair_accumulate(x_ptr, stride_xm, w_ptr, mul_ptr, M, K, k_start, k_end, col_lo, col_hi,
                     HAS_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     xsave_ptr, SAVE_X: tl.constexpr, SWAP: tl.constexpr = False, LATE_SS: tl.constexpr = False):
    """(x ⊙ mul)·W over k in [k_start, k_end) for both column sets, and Σ x² of the rows there.
    RMSNorm is a per-row scale, so it is applied to the accumulators afterwards: one pass over x.
    LATE_SS: the squares are summed elementwise in the loop and across the columns once after it,
    instead of a cross-thread row sum (shuffles) in every K tile.
    SAVE_X: program 0 also copies the rows of x it reads to `xsave` [M, K] (RTC's backward).
    SWAP: the transposed product W·xᵀ, both column sets stacked into one [2·BLOCK_N, BLOCK_K]
    weight tile as the MMA's M side (64 rows at BLOCK_N 32: Hopper's wgmma), the few activation
    rows as its N side ("swap AB" for skinny GEMMs); same result, transposed back at the end."""
    rm = tl.arange(0, BLOCK_M)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    if SWAP:
        rows2 = tl.arange(0, 2 * BLOCK_N)
        w_rows = tl.where(rows2 < BLOCK_N, tl.min(col_lo, axis=0) + rows2, tl.min(col_hi, axis=0) + rows2 - BLOCK_N)
        acc_t = tl.zeros([2 * BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc_lo = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0).to(tl.float32)
        if SAVE_X:
            tl.store(xsave_ptr + rm[:, None] * K + rk[None, :], xv, mask=(rm[:, None] < M) & (tl.program_id(0) == 0))
        if LATE_SS:
            sq += xv * xv
        else:
            ss += tl.sum(xv * xv, axis=1)
        if HAS_MUL:
            xv = xv * tl.load(mul_ptr + rk)[None, :]
        a = xv.to(w_ptr.dtype.element_ty)
        if SWAP:
            acc_t += tl.dot(tl.load(w_ptr + w_rows[:, None] * K + rk[None, :]), tl.trans(a))
        else:
            w_lo = tl.load(w_ptr + col_lo[:, None] * K + rk[None, :])
            w_hi = tl.load(w_ptr + col_hi[:, None] * K + rk[None, :])
            acc_lo += tl.dot(a, tl.trans(w_lo))
            acc_hi += tl.dot(a, tl.trans(w_hi))
    if LATE_SS:
        ss = tl.sum(sq, axis=1)
    if SWAP:
        lo_t, hi_t = tl.split(tl.permute(tl.reshape(acc_t, [2, BLOCK_N, BLOCK_M]), (1, 2, 0)))
        acc_lo = tl.trans(lo_t)
        acc_hi = tl.trans(hi_t)
    return acc_lo, acc_hi, ss


@triton.jit
def _pair_epilogue(acc_lo, acc_hi, ss, bias_ptr, out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
                   M, K, eps, p0, head, cin, col_lo, col_hi,
                   EPI: tl.constexpr, HAS_BIAS: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, pre_ptr, stride_pre, SAVE_PRE: tl.constexpr):
    """inv-rms, bias, then RoPE → q / the K and V cache rows, or GEGLU → act. SAVE_PRE (GEGLU):
    also the float32 pre-activations [gate | up] to `pre` (row stride `stride_pre`; RTC's backward)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = HD // 2
    inv = 1.0 / tl.sqrt(ss / K + eps)
    acc_lo = acc_lo * inv[:, None]
    acc_hi = acc_hi * inv[:, None]
    if HAS_BIAS:
        acc_lo += tl.load(bias_ptr + col_lo)[None, :]
        acc_hi += tl.load(bias_ptr + col_hi)[None, :]
    mmask = rm[:, None] < M
    if EPI == 1:
        if SAVE_PRE:
            tl.store(pre_ptr + rm[:, None] * stride_pre + col_lo[None, :], acc_lo, mask=mmask)
            tl.store(pre_ptr + rm[:, None] * stride_pre + col_hi[None, :], acc_hi, mask=mmask)
        act = _gelu_tanh(acc_lo) * acc_hi
        tl.store(out_ptr + rm[:, None] * stride_om + (p0 + rn)[None, :], act.to(out_ptr.dtype.element_ty), mask=mmask)
    else:
        if head <= NQ:  # the q heads and the k head are rotated; v is not
            c_lo = tl.load(cos_ptr + rm[:, None] * HD + cin[None, :], mask=mmask, other=0.0).to(tl.float32)
            c_hi = tl.load(cos_ptr + rm[:, None] * HD + HALF + cin[None, :], mask=mmask, other=0.0).to(tl.float32)
            s_lo = tl.load(sin_ptr + rm[:, None] * HD + cin[None, :], mask=mmask, other=0.0).to(tl.float32)
            s_hi = tl.load(sin_ptr + rm[:, None] * HD + HALF + cin[None, :], mask=mmask, other=0.0).to(tl.float32)
            lo = acc_lo * c_lo - acc_hi * s_lo
            hi = acc_hi * c_hi + acc_lo * s_hi
        else:
            lo = acc_lo
            hi = acc_hi
        if head < NQ:
            dst = out_ptr + rm[:, None] * stride_om + head * HD
        elif head == NQ:
            dst = k_out_ptr + rm[:, None] * HD
        else:
            dst = v_out_ptr + rm[:, None] * HD
        tl.store(dst + cin[None, :], lo.to(out_ptr.dtype.element_ty), mask=mmask)
        tl.store(dst + HALF + cin[None, :], hi.to(out_ptr.dtype.element_ty), mask=mmask)


@triton.jit
def norm_linear_pair_kernel(
        x_ptr, stride_xm, w_ptr, mul_ptr, bias_ptr,
        out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
        M, K, eps, pair_offset,
        EPI: tl.constexpr, HAS_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        xsave_ptr, pre_ptr, SAVE_X: tl.constexpr, SAVE_PRE: tl.constexpr, PDL: tl.constexpr = False,
        SWAP: tl.constexpr = False, LATE_SS: tl.constexpr = False):
    _pdl_enter(PDL)
    p0 = tl.program_id(0) * BLOCK_N
    head, cin, col_lo, col_hi = _pair_columns(p0, pair_offset, EPI, HD, BLOCK_N)
    acc_lo, acc_hi, ss = _pair_accumulate(x_ptr, stride_xm, w_ptr, mul_ptr, M, K, 0, K, col_lo, col_hi,
                                          HAS_MUL, BLOCK_M, BLOCK_N, BLOCK_K, xsave_ptr, SAVE_X, SWAP, LATE_SS)
    _pair_epilogue(acc_lo, acc_hi, ss, bias_ptr, out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
                   M, K, eps, p0, head, cin, col_lo, col_hi, EPI, HAS_BIAS, NQ, HD, BLOCK_M, BLOCK_N,
                   pre_ptr, 2 * pair_offset, SAVE_PRE)


@triton.jit
def norm_linear_pair_splitk_kernel(
        x_ptr, stride_xm, w_ptr, mul_ptr, bias_ptr,
        out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr, part_ptr, cnt_ptr,
        M, K, eps, pair_offset, n_pairs,
        EPI: tl.constexpr, HAS_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
        SPLITS: tl.constexpr, FENCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
        SWAP: tl.constexpr = False, LATE_SS: tl.constexpr = False):
    """`norm_linear_pair` with K split over grid axis 1 (SPLITS programs per pair block, K/SPLITS
    each). Workspace `part` (float32): [SPLITS, 2, M, n_pairs] partial sums of the lo/hi columns,
    then [SPLITS, pair blocks, M] partial Σ x²; `cnt` int32 [pair blocks], zero between launches."""
    _pdl_enter(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    p0 = pid * BLOCK_N
    head, cin, col_lo, col_hi = _pair_columns(p0, pair_offset, EPI, HD, BLOCK_N)
    k_per_split = K // SPLITS
    k_start = pid_k * k_per_split
    acc_lo, acc_hi, ss = _pair_accumulate(x_ptr, stride_xm, w_ptr, mul_ptr, M, K, k_start, k_start + k_per_split,
                                          col_lo, col_hi, HAS_MUL, BLOCK_M, BLOCK_N, BLOCK_K, x_ptr, False, SWAP,
                                          LATE_SS)
    rm = tl.arange(0, BLOCK_M)
    rp = p0 + tl.arange(0, BLOCK_N)
    mmask = rm[:, None] < M
    tile = rm[:, None] * n_pairs + rp[None, :]
    ss_base = part_ptr + SPLITS * 2 * M * n_pairs
    tl.store(part_ptr + (pid_k * 2) * M * n_pairs + tile, acc_lo, mask=mmask)
    tl.store(part_ptr + (pid_k * 2 + 1) * M * n_pairs + tile, acc_hi, mask=mmask)
    tl.store(ss_base + (pid_k * n_blocks + pid) * M + rm, ss, mask=rm < M)
    if _arrive(cnt_ptr + pid, FENCE) == SPLITS - 1:
        # One [SPLITS, BLOCK_M, BLOCK_N] load per operand: every slot in flight at once.
        sk = tl.arange(0, SPLITS)
        slot = (sk * 2)[:, None, None] * M * n_pairs + tile[None, :, :]
        acc_lo = tl.sum(tl.load(part_ptr + slot, mask=mmask[None, :, :], other=0.0, cache_modifier=".cg"), axis=0)
        acc_hi = tl.sum(tl.load(part_ptr + M * n_pairs + slot, mask=mmask[None, :, :], other=0.0,
                                cache_modifier=".cg"), axis=0)
        ss = tl.sum(tl.load(ss_base + (sk[:, None] * n_blocks + pid) * M + rm[None, :], mask=rm[None, :] < M,
                            other=0.0, cache_modifier=".cg"), axis=0)
        tl.store(cnt_ptr + pid, 0)
        _pair_epilogue(acc_lo, acc_hi, ss, bias_ptr, out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
                       M, K, eps, p0, head, cin, col_lo, col_hi, EPI, HAS_BIAS, NQ, HD, BLOCK_M, BLOCK_N,
                       part_ptr, 0, False)


@triton.jit
def linear_splitk_kernel(
        x_ptr, stride_xm, w_ptr, bias_ptr, gate_ptr, out_ptr, stride_om,
        M, N, K, k_per_split,
        EPI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEM: tl.constexpr = "acq_rel",
        PDL: tl.constexpr = False, SWAP: tl.constexpr = False):
    """SEM: the residual atomics' memory order. "acq_rel" (Triton's default) puts a MEMBAR.GPU before
    and an L1 invalidate after every atomic (sm_90 SASS); "relaxed" is a plain RED: the sum only needs
    atomicity, and the next kernel sees it anyway (kernel boundary)."""
    _pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # SWAP: W·xᵀ (see `_pair_accumulate`)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0)
        a = a.to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        elif SWAP:
            acc_t += tl.dot(w, tl.trans(a))
        else:
            acc += tl.dot(a, tl.trans(w))
    if SWAP and not IEEE:
        acc = tl.trans(acc_t)
    mask = (rm[:, None] < M) & nmask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if EPI == 2:
        if HAS_GATE:
            acc = acc * tl.load(gate_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(out, acc, mask=mask, sem=SEM)
    elif EPI == 1:
        tl.store(out, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_head_kernel(
        x_ptr, stride_xm, mul_ptr, w_ptr, bias_ptr, xin_ptr, xout_ptr,
        M, N, K, eps,
        HAS_MUL: tl.constexpr, ROUND_TO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    inv = _inv_rms(x_ptr, stride_xm, M, K, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0).to(tl.float32)
        xv = xv * inv[:, None]
        if HAS_MUL:
            xv = xv * tl.load(mul_ptr + rk)[None, :]
        a = xv.to(ROUND_TO).to(tl.float32)  # the expert's output is bf16 before the float32 head
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None], other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
    mask = (rm[:, None] < M) & nmask[None, :]
    acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    offs = rm[:, None] * N + rn[None, :]
    x_old = tl.load(xin_ptr + offs, mask=mask, other=0.0)
    tl.store(xout_ptr + offs, x_old + acc, mask=mask)


@triton.jit
def norm_head_splitk_kernel(
        x_ptr, stride_xm, mul_ptr, w_ptr, bias_ptr, xin_ptr, xout_ptr, part_ptr, cnt_ptr,
        M, N, K, eps,
        HAS_MUL: tl.constexpr, ROUND_TO: tl.constexpr, SPLITS: tl.constexpr, FENCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KALL: tl.constexpr,
        PDL: tl.constexpr = False):
    """`norm_head` with K split over grid axis 1. The activations are rounded to ROUND_TO after the
    norm, before the product (as in `norm_head`), so each program needs the whole row's inv-rms
    first: wide loads of x from L2 (BLOCK_KALL columns at a time, dividing K; one load at pi0.5's
    10 rows). Workspace `part` float32 [SPLITS, M, N]; `cnt` int32 [N blocks]."""
    _pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    mask = (rm[:, None] < M) & nmask[None, :]
    inv = _inv_rms(x_ptr, stride_xm, M, K, eps, BLOCK_M, BLOCK_KALL)
    k_per_split = K // SPLITS
    k_start = pid_k * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0).to(tl.float32)
        xv = xv * inv[:, None]
        if HAS_MUL:
            xv = xv * tl.load(mul_ptr + rk)[None, :]
        a = xv.to(ROUND_TO).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None], other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
    offs = rm[:, None] * N + rn[None, :]
    tl.store(part_ptr + pid_k * M * N + offs, acc, mask=mask)
    if _arrive(cnt_ptr + pid_n, FENCE) == SPLITS - 1:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(cnt_ptr + pid_n, 0)
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
        x_old = tl.load(xin_ptr + offs, mask=mask, other=0.0)
        tl.store(xout_ptr + offs, x_old + acc, mask=mask)


@triton.jit
def _attention_partial(q_ptr, k_ptr, v_ptr, bias_ptr, rows, rmask, NKEYS, keys_per_split, stride_bias, S, scale,
                       HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of this program's query rows over keys [pid_s·keys_per_split, +keys_per_split):
    the unnormalised output [BLOCK_R, HD], the row max and the row sum."""
    pid_s = tl.program_id(0)
    tok = tl.minimum(rows // HEADS, S - 1)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + rows[:, None] * HD + d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HD], dtype=tl.float32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, NKEYS)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kmask = keys < end
        k = tl.load(k_ptr + keys[:, None] * HD + d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        b = tl.load(bias_ptr + tok[:, None] * stride_bias + keys[None, :], mask=kmask[None, :], other=float("-inf"))
        s = s + b
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + keys[:, None] * HD + d[None, :], mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_attention_partial(part_o_ptr, part_ml_ptr, acc, m_i, l_i, rows, rmask, R, HD: tl.constexpr):
    pid_s = tl.program_id(0)
    d = tl.arange(0, HD)
    base = pid_s * R + rows
    tl.store(part_o_ptr + base[:, None] * HD + d[None, :], acc, mask=rmask[:, None])
    tl.store(part_ml_ptr + (pid_s * 2) * R + rows, m_i, mask=rmask)
    tl.store(part_ml_ptr + (pid_s * 2 + 1) * R + rows, l_i, mask=rmask)


@triton.jit
def attention_split_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, part_o_ptr, part_ml_ptr,
        R, NKEYS, keys_per_split, stride_bias, S, scale,
        HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """Rows r = token·HEADS + head of q [S·HEADS, HD]; keys [NKEYS, HD] shared by all heads.
    Writes unnormalised partial outputs [splits, R, HD] and (max, sum) [splits, 2, R]."""
    _pdl_enter(PDL)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    acc, m_i, l_i = _attention_partial(q_ptr, k_ptr, v_ptr, bias_ptr, rows, rmask, NKEYS, keys_per_split,
                                       stride_bias, S, scale, HEADS, HD, BLOCK_R, BLOCK_N)
    _store_attention_partial(part_o_ptr, part_ml_ptr, acc, m_i, l_i, rows, rmask, R, HD)


@triton.jit
def attention_combine_kernel(part_o_ptr, part_ml_ptr, out_ptr, R, n_splits,
                             HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_tot = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m_tot = tl.maximum(m_tot, tl.load(part_ml_ptr + (s * 2) * R + rows, mask=rmask, other=0.0))
    denom = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.load(part_ml_ptr + (s * 2) * R + rows, mask=rmask, other=0.0)
        l = tl.load(part_ml_ptr + (s * 2 + 1) * R + rows, mask=rmask, other=0.0)
        w = tl.exp(m - m_tot)
        denom += w * l
        o = tl.load(part_o_ptr + (s * R + rows)[:, None] * HD + d[None, :], mask=rmask[:, None], other=0.0)
        acc += w[:, None] * o
    out = acc / denom[:, None]
    tl.store(out_ptr + rows[:, None] * HD + d[None, :], out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _combine_rows(part_o_ptr, part_ml_ptr, out_ptr, rows, rmask, R, n_splits, d0,
                  HD: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                  lse_ptr, SAVE_LSE: tl.constexpr):
    """out[rows, d0:d0 + BLOCK_D] from all splits' partials with one load per operand (a
    [SPLITS_P2, BLOCK_R, BLOCK_D] tile): every split's bytes in flight at once, not one split per
    round trip as in `attention_combine`. SAVE_LSE: the rows' log-sum-exp of the scaled, biased
    scores to `lse` [R] (RTC's backward recomputes the probabilities from it)."""
    sp = tl.arange(0, SPLITS_P2)
    ml_mask = (sp[:, None] < n_splits) & rmask[None, :]
    m = tl.load(part_ml_ptr + (sp[:, None] * 2) * R + rows[None, :], mask=ml_mask, other=float("-inf"),
                cache_modifier=".cg")
    l = tl.load(part_ml_ptr + (sp[:, None] * 2 + 1) * R + rows[None, :], mask=ml_mask, other=0.0,
                cache_modifier=".cg")
    m_tot = tl.where(rmask, tl.max(m, axis=0), 0.0)  # padded rows: finite, never stored
    w = tl.exp(m - m_tot[None, :])  # [SPLITS_P2, BLOCK_R]; 0 for the padded splits
    denom = tl.where(rmask, tl.sum(w * l, axis=0), 1.0)
    if SAVE_LSE:
        tl.store(lse_ptr + rows, m_tot + tl.log(denom), mask=rmask & (d0 == 0))
    d = d0 + tl.arange(0, BLOCK_D)
    o = tl.load(part_o_ptr + ((sp[:, None, None] * R + rows[None, :, None]) * HD + d[None, None, :]),
                mask=ml_mask[:, :, None], other=0.0, cache_modifier=".cg")
    out = tl.sum(w[:, :, None] * o, axis=0) / denom[:, None]
    tl.store(out_ptr + rows[:, None] * HD + d[None, :], out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def attention_combine_wide_kernel(part_o_ptr, part_ml_ptr, out_ptr, R, n_splits,
                                  HD: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_R: tl.constexpr,
                                  BLOCK_D: tl.constexpr, lse_ptr, SAVE_LSE: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    _combine_rows(part_o_ptr, part_ml_ptr, out_ptr, rows, rows < R, R, n_splits, tl.program_id(1) * BLOCK_D,
                  HD, SPLITS_P2, BLOCK_R, BLOCK_D, lse_ptr, SAVE_LSE)


@triton.jit
def attention_fused_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, part_o_ptr, part_ml_ptr, out_ptr, cnt_ptr,
        R, NKEYS, keys_per_split, stride_bias, S, scale, n_splits,
        HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr, FENCE: tl.constexpr):
    """`attention_split` whose last-arriving split program of each row block also combines that
    row block (no `attention_combine` launch). `cnt` int32 [row blocks], zero between launches."""
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    acc, m_i, l_i = _attention_partial(q_ptr, k_ptr, v_ptr, bias_ptr, rows, rmask, NKEYS, keys_per_split,
                                       stride_bias, S, scale, HEADS, HD, BLOCK_R, BLOCK_N)
    _store_attention_partial(part_o_ptr, part_ml_ptr, acc, m_i, l_i, rows, rmask, R, HD)
    if _arrive(cnt_ptr + pid_r, FENCE) == n_splits - 1:
        for d0 in tl.static_range(0, HD, BLOCK_D):
            _combine_rows(part_o_ptr, part_ml_ptr, out_ptr, rows, rmask, R, n_splits, d0,
                          HD, SPLITS_P2, BLOCK_R, BLOCK_D, part_ml_ptr, False)
        tl.store(cnt_ptr + pid_r, 0)


@triton.jit
def residual_layer_norm_rows_kernel(x_ptr, y_ptr, bias_ptr, h_ptr, N, stride_x, stride_y, stride_h, eps,
                                    BLOCK: tl.constexpr):
    """One row: x ← x + y + bias (rounded once to x's dtype, in place), h = LayerNorm(x) without
    gain or shift (folded into the next linear), from the rounded x as the unfused ops see it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x_new = (x + y + b).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * stride_x + cols, x_new, mask=mask)
    v = x_new.to(tl.float32)
    mean = tl.sum(v, axis=0) / N
    centred = tl.where(mask, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    tl.store(h_ptr + row * stride_h + cols, (centred * rstd).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def geglu_rows_kernel(gu_ptr, out_ptr, scale_ptr, N, stride_gu, stride_out,
                      QUANT: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    """One row of gelu_tanh(gate) ⊙ up (gu = [gate | up], N columns each). QUANT: e4m3 with the
    row's scale amax / FP8_MAX written to scale_ptr[row]. ONE_PASS (BLOCK ≥ N): the whole row in
    registers, so gate / up are read once; otherwise the act is recomputed in a second pass."""
    row = tl.program_id(0)
    g_row = gu_ptr + row.to(tl.int64) * stride_gu
    o_row = out_ptr + row.to(tl.int64) * stride_out
    if QUANT and ONE_PASS:
        cols = tl.arange(0, BLOCK)
        g = tl.load(g_row + cols, mask=cols < N, other=0.0).to(tl.float32)
        u = tl.load(g_row + N + cols, mask=cols < N, other=0.0).to(tl.float32)
        act = _gelu_tanh(g) * u
        scale = tl.maximum(tl.max(tl.abs(act), axis=0), 1e-12) / FP8_MAX
        tl.store(scale_ptr + row, scale)
        q = tl.minimum(tl.maximum(act / scale, -FP8_MAX), FP8_MAX)
        tl.store(o_row + cols, q.to(out_ptr.dtype.element_ty), mask=cols < N)
    elif QUANT:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, N, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            g = tl.load(g_row + cols, mask=cols < N, other=0.0).to(tl.float32)
            u = tl.load(g_row + N + cols, mask=cols < N, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(_gelu_tanh(g) * u))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
        tl.store(scale_ptr + row, scale)
        for c0 in range(0, N, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            g = tl.load(g_row + cols, mask=cols < N, other=0.0).to(tl.float32)
            u = tl.load(g_row + N + cols, mask=cols < N, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_gelu_tanh(g) * u / scale, -FP8_MAX), FP8_MAX)
            tl.store(o_row + cols, q.to(out_ptr.dtype.element_ty), mask=cols < N)
    else:
        for c0 in range(0, N, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            g = tl.load(g_row + cols, mask=cols < N, other=0.0).to(tl.float32)
            u = tl.load(g_row + N + cols, mask=cols < N, other=0.0).to(tl.float32)
            tl.store(o_row + cols, (_gelu_tanh(g) * u).to(out_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, N, stride_x, stride_out, FP8_MAX: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Per-row symmetric e4m3 quantization in two passes over the row (the second from L2)."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + cols, mask=cols < N, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
    tl.store(scale_ptr + row, scale)
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < N, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, q.to(out_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def fp8_linear_residual_kernel(a_desc, sa_ptr, w_desc, sw_ptr, x_ptr, P, N, K, stride_x,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[P, N] += (a · sa) · (W · sw)ᵀ in place, rounded once to x's dtype: a [P, K] e4m3 with row
    scales sa [P], W [N, K] e4m3 with row scales sw [N], both read through TMA descriptors of
    [BLOCK_M | BLOCK_N, BLOCK_K] tiles (rows and columns past the ends read as 0). One program per
    output tile, so the residual needs no atomics."""
    num_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    # the row blocks of one column block are neighbours: its weight tiles come from HBM once
    off_m, off_n = (pid % num_m) * BLOCK_M, (pid // num_m) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        acc = tl.dot(a_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    mask = (rm < P)[:, None] & (rn < N)[None, :]
    y = acc * tl.load(sa_ptr + rm, mask=rm < P, other=0.0)[:, None] * tl.load(sw_ptr + rn, mask=rn < N,
                                                                                other=0.0)[None, :]
    ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x + rn[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (x.to(tl.float32) + y).to(x.dtype), mask=mask)


@triton.jit
def rope_qkv_rows_kernel(qkv_ptr, stride_qkv, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, P,
                         NQ: tl.constexpr, HD: tl.constexpr, BLOCK_P: tl.constexpr):
    """The prefix's fused-QKV output [P, (NQ + 2)·HD] (NQ may be 0: K/V only), program (row block,
    head): head < NQ → RoPE → q [P, NQ·HD]; NQ → RoPE → k [P, HD]; NQ + 1 → v [P, HD] (the
    static cache rows). Rotate-half RoPE as in `rowops.rotate`, in float32, rounded once."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    head = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    c = tl.arange(0, HALF)
    rmask = rows[:, None] < P
    src = qkv_ptr + rows[:, None].to(tl.int64) * stride_qkv + head * HD + c[None, :]
    lo = tl.load(src, mask=rmask, other=0.0).to(tl.float32)
    hi = tl.load(src + HALF, mask=rmask, other=0.0).to(tl.float32)
    if head <= NQ:
        tab = rows[:, None] * HD + c[None, :]
        c_lo = tl.load(cos_ptr + tab, mask=rmask, other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + tab + HALF, mask=rmask, other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + tab, mask=rmask, other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + tab + HALF, mask=rmask, other=0.0).to(tl.float32)
        lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
    if head < NQ:
        dst = q_ptr + rows[:, None] * (NQ * HD) + head * HD
    elif head == NQ:
        dst = k_ptr + rows[:, None] * HD
    else:
        dst = v_ptr + rows[:, None] * HD
    tl.store(dst + c[None, :], lo.to(k_ptr.dtype.element_ty), mask=rmask)
    tl.store(dst + HALF + c[None, :], hi.to(k_ptr.dtype.element_ty), mask=rmask)


# Under TRITON_INTERPRET=1 (fixed when the kernels are decorated) `triton.jit` gives interpreted
# functions: no inline PTX there, and the programs run one after another, so `_arrive` needs no fence.
FENCE = isinstance(norm_linear_pair_splitk_kernel, triton.runtime.jit.JITFunction)
