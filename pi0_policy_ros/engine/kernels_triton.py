"""Triton kernels for the denoise step (skinny M ≤ 64 rows, bandwidth bound).

Imported only by `denoise_triton` (never at package import), so the CPU CI never needs Triton.

- `norm_linear_pair`: RMSNorm (×(1 + scale)) in the prologue, two column sets per program:
  RoPE pairs (d, d + hd/2) of each head for the fused QKV — writing q to a buffer and the suffix
  K/V straight into the static cache — or (gate, up) columns for GEGLU.
- `linear_splitk`: x·Wᵀ with K split over programs; epilogues: store (+ bias), SiLU, or
  `out += gate ⊙ (x·Wᵀ)` by float32 atomics (the residual stream).
- `norm_head`: final norm → float32 output projection (dt folded) → x_next = x + W'h + b'.
- `attention_split` + `attention_combine`: flash-decoding over the one KV head; the query rows
  are (token, head) pairs, so all heads share each K/V tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def norm_linear_pair_kernel(
        x_ptr, stride_xm, w_ptr, mul_ptr, bias_ptr,
        out_ptr, stride_om, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
        M, K, eps, pair_offset,
        EPI: tl.constexpr, HAS_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    p0 = pid * BLOCK_N
    HALF: tl.constexpr = HD // 2
    if EPI == 0:
        head = p0 // HALF
        cin = p0 % HALF + rn  # column inside the head's first half
        col_lo = head * HD + cin
        col_hi = col_lo + HALF
    else:
        head = 0
        cin = rn
        col_lo = p0 + rn
        col_hi = col_lo + pair_offset
    # RMSNorm is a per-row scale, so it is applied to the accumulators after the loop: one pass
    # over x instead of two.
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0).to(tl.float32)
        ss += tl.sum(xv * xv, axis=1)
        if HAS_MUL:
            xv = xv * tl.load(mul_ptr + rk)[None, :]
        a = xv.to(w_ptr.dtype.element_ty)
        w_lo = tl.load(w_ptr + col_lo[:, None] * K + rk[None, :])
        w_hi = tl.load(w_ptr + col_hi[:, None] * K + rk[None, :])
        acc_lo += tl.dot(a, tl.trans(w_lo))
        acc_hi += tl.dot(a, tl.trans(w_hi))
    inv = 1.0 / tl.sqrt(ss / K + eps)
    acc_lo = acc_lo * inv[:, None]
    acc_hi = acc_hi * inv[:, None]
    if HAS_BIAS:
        acc_lo += tl.load(bias_ptr + col_lo)[None, :]
        acc_hi += tl.load(bias_ptr + col_hi)[None, :]
    mmask = rm[:, None] < M
    if EPI == 1:
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
def linear_splitk_kernel(
        x_ptr, stride_xm, w_ptr, bias_ptr, gate_ptr, out_ptr, stride_om,
        M, N, K, k_per_split,
        EPI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=rm[:, None] < M, other=0.0)
        a = a.to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w))
    mask = (rm[:, None] < M) & nmask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if EPI == 2:
        if HAS_GATE:
            acc = acc * tl.load(gate_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(out, acc, mask=mask)
    elif EPI == 1:
        tl.store(out, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_head_kernel(
        x_ptr, stride_xm, mul_ptr, w_ptr, bias_ptr, xin_ptr, xout_ptr,
        M, N, K, eps,
        HAS_MUL: tl.constexpr, ROUND_TO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
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
def attention_split_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, part_o_ptr, part_ml_ptr,
        R, NKEYS, keys_per_split, stride_bias, S, scale,
        HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows r = token·HEADS + head of q [S·HEADS, HD]; keys [NKEYS, HD] shared by all heads.
    Writes unnormalised partial outputs [splits, R, HD] and (max, sum) [splits, 2, R]."""
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
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
    base = pid_s * R + rows
    tl.store(part_o_ptr + base[:, None] * HD + d[None, :], acc, mask=rmask[:, None])
    tl.store(part_ml_ptr + (pid_s * 2) * R + rows, m_i, mask=rmask)
    tl.store(part_ml_ptr + (pid_s * 2 + 1) * R + rows, l_i, mask=rmask)


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
def geglu_rows_kernel(gu_ptr, out_ptr, scale_ptr, N, stride_gu, stride_out,
                      QUANT: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """One row of gelu_tanh(gate) ⊙ up (gu = [gate | up], N columns each). QUANT: e4m3 with the
    row's scale amax / FP8_MAX written to scale_ptr[row] (the act is recomputed, not stored)."""
    row = tl.program_id(0)
    g_row = gu_ptr + row.to(tl.int64) * stride_gu
    o_row = out_ptr + row.to(tl.int64) * stride_out
    if QUANT:
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
