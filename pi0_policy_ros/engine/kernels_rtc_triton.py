"""Triton kernels for RTC's vector-Jacobian product through the action expert (`rtc_triton`).

Only gradients with respect to the activations are needed (the weights are constants), so the
backward of a linear layer is one more skinny product `dy · W`, run by cuBLAS; these kernels are
the parts between those products, each reading what the forward kernels saved:
- `geglu_backward`: d[gate | up] from d act and the saved float32 pre-activations;
- `rms_backward`: through `bf16(x ⊙ inv_rms ⊙ mul)` (x the saved residual rows), added to the
  residual gradient, which it also hands to the next product, times the residual gate;
- `attention_backward`: flash-attention's backward for the (token, head) query rows over the
  static prefix keys and this step's suffix keys: dq for every row, dk / dv for the suffix keys
  only (the prefix cache is a constant), float32 atomics over the key splits;
- `rope_backward`: un-rotates dq and dk, assembles d[q | k | v] for the QKV product and zeroes
  the atomic accumulators for the next layer (so CUDA-graph replays start from zero).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def geglu_backward_kernel(dact_ptr, pre_ptr, dgu_ptr, N, BLOCK: tl.constexpr):
    """Row `program_id(0)`: act = gelu_tanh(g) ⊙ u with pre = [g | u] (float32 [M, 2N]);
    writes d[g | u] [M, 2N] in dgu's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    da = tl.load(dact_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(pre_ptr + row * 2 * N + cols, mask=mask, other=0.0)
    u = tl.load(pre_ptr + row * 2 * N + N + cols, mask=mask, other=0.0)
    k0: tl.constexpr = 0.7978845608028654
    k1: tl.constexpr = 0.044715
    th = 2.0 * tl.sigmoid(2.0 * k0 * (g + k1 * g * g * g)) - 1.0  # tanh
    gelu = 0.5 * g * (1.0 + th)
    dgelu = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * k0 * (1.0 + 3.0 * k1 * g * g)
    out = dgu_ptr + row * 2 * N
    tl.store(out + cols, (da * u * dgelu).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(out + N + cols, (da * gelu).to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_backward_kernel(x_ptr, g_ptr, mul_ptr, dr_ptr, dy_ptr, gate_ptr, W, eps,
                        HAS_MUL: tl.constexpr, HAS_GATE: tl.constexpr, ACCUMULATE: tl.constexpr,
                        BLOCK_W: tl.constexpr):
    """Row `program_id(0)` of the forward `a = (x ⊙ mul) · inv_rms(x)`, whose product's input
    gradient is g (the product `da·W` already taken). With n = x·inv and dn = g ⊙ mul:
    dx = inv · (dn − n · mean(dn ⊙ n)). dr (float32) = dx, or dr + dx (ACCUMULATE);
    dy = dr ⊙ gate in dy's dtype, the next product's input."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    mask = cols < W
    x = tl.load(x_ptr + row * W + cols, mask=mask, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / W + eps)
    n = x * inv
    dn = tl.load(g_ptr + row * W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_MUL:
        dn = dn * tl.load(mul_ptr + cols, mask=mask, other=0.0)
    dx = inv * (dn - n * (tl.sum(dn * n, axis=0) / W))
    if ACCUMULATE:
        dx += tl.load(dr_ptr + row * W + cols, mask=mask, other=0.0)
    tl.store(dr_ptr + row * W + cols, dx, mask=mask)
    if HAS_GATE:
        dx = dx * tl.load(gate_ptr + cols, mask=mask, other=0.0)
    tl.store(dy_ptr + row * W + cols, dx.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def attention_backward_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, lse_ptr, o_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr,
        R, NKEYS, SUFFIX_START, keys_per_split, stride_bias, S, scale,
        HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (key splits, row blocks), the forward's layout: rows r = token·HEADS + head of q / o /
    do [R, HD]; keys / values [NKEYS, HD] shared by the heads; `lse` [R] saved by the forward.
    P = exp(q·kᵀ·scale + bias − lse), dS = P ⊙ (do·vᵀ − rowsum(do ⊙ o)):
    dq += dS·k·scale for every row; for keys ≥ SUFFIX_START (this step's, row j − SUFFIX_START of
    dk / dv [S, HD]): dk += dSᵀ·q·scale, dv += Pᵀ·do, summed over all rows (one KV head).
    dq, dk, dv are float32 accumulators, zero before the launch."""
    pid_s = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    tok = tl.minimum(rows // HEADS, S - 1)
    d = tl.arange(0, HD)
    tile = rows[:, None] * HD + d[None, :]
    q = tl.load(q_ptr + tile, mask=rmask[:, None], other=0.0)
    do = tl.load(do_ptr + tile, mask=rmask[:, None], other=0.0)
    o = tl.load(o_ptr + tile, mask=rmask[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_R, HD], dtype=tl.float32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, NKEYS)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kmask = keys < end
        k = tl.load(k_ptr + keys[:, None] * HD + d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(v_ptr + keys[:, None] * HD + d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        b = tl.load(bias_ptr + tok[:, None] * stride_bias + keys[None, :], mask=kmask[None, :], other=float("-inf"))
        p = tl.exp(s + b - lse[:, None])
        p = tl.where(rmask[:, None], p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        if n0 + BLOCK_N > SUFFIX_START:
            smask = (keys >= SUFFIX_START) & kmask
            srow = (keys - SUFFIX_START)[:, None] * HD + d[None, :]
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
            dv = tl.dot(tl.trans(p.to(do.dtype)), do)
            tl.atomic_add(dk_ptr + srow, dk, mask=smask[:, None], sem="relaxed")
            tl.atomic_add(dv_ptr + srow, dv, mask=smask[:, None], sem="relaxed")
    tl.atomic_add(dq_ptr + tile, dq * scale, mask=rmask[:, None], sem="relaxed")


@triton.jit
def rope_backward_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr,
                         NQ: tl.constexpr, HD: tl.constexpr):
    """Program (token, head) for head < NQ (q), NQ (k), NQ + 1 (v): the forward rotation
    lo' = lo·c_lo − hi·s_lo, hi' = hi·c_hi + lo·s_hi, transposed, into dqkv [S, (NQ + 2)·HD] in
    its dtype; then the float32 source row is zeroed for the next layer's atomics."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    c = tl.arange(0, HALF)
    if head < NQ:
        src = dq_ptr + (tok * NQ + head) * HD
    elif head == NQ:
        src = dk_ptr + tok * HD
    else:
        src = dv_ptr + tok * HD
    g_lo = tl.load(src + c)
    g_hi = tl.load(src + HALF + c)
    if head <= NQ:
        c_lo = tl.load(cos_ptr + tok * HD + c).to(tl.float32)
        c_hi = tl.load(cos_ptr + tok * HD + HALF + c).to(tl.float32)
        s_lo = tl.load(sin_ptr + tok * HD + c).to(tl.float32)
        s_hi = tl.load(sin_ptr + tok * HD + HALF + c).to(tl.float32)
        lo = g_lo * c_lo + g_hi * s_hi
        hi = g_hi * c_hi - g_lo * s_lo
    else:
        lo = g_lo
        hi = g_hi
    dst = dqkv_ptr + tok * (NQ + 2) * HD + head * HD
    tl.store(dst + c, lo.to(dqkv_ptr.dtype.element_ty))
    tl.store(dst + HALF + c, hi.to(dqkv_ptr.dtype.element_ty))
    tl.store(src + c, tl.zeros([HALF], dtype=tl.float32))
    tl.store(src + HALF + c, tl.zeros([HALF], dtype=tl.float32))
