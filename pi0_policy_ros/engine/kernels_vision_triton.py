"""Triton kernels for the vision stage's small GEMMs and attention (`rowops` dispatches to them).

At two images SigLIP runs 512 rows, and two of its four linears have only 1152 output columns: on
[128, 128] tiles that is 36 programs for 132 SMs, each walking all of K alone (cuBLAS: out 6.3 µs,
fc2 13.9 µs for 1.4 and 5.1 GFLOP). `linear_splitk_partials_kernel` splits K over programs and
writes each split's float32 partial product; the residual + LayerNorm row kernel that follows
anyway (`kernels_triton.residual_layer_norm_rows_kernel`) sums them, so the split costs no
atomics, no zeroing and no extra pass, and the sum's order is fixed (deterministic).

`vision_attention_kernel`: SigLIP's attention per (image, head) with all of an image's 256 keys in
one block, reading q, k and v straight from the fused qkv rows and writing the out projection's
row layout (torch's SDPA: 9.5 µs a layer on the H100, notes attempt 18).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def linear_splitk_partials_kernel(a_desc, w_desc, part_ptr, M, N, K_SPLIT,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (output tile, split s): part[s] = a[:, ks] · W[:, ks]ᵀ in float32 over the split's
    K_SPLIT columns ks (a multiple of BLOCK_K; the TMA descriptors of a [M, K] and W [N, K] read
    columns past K as 0). part is [splits, M, N] contiguous."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # the row blocks of one column block are neighbours: its weight tiles come from HBM once
    off_m, off_n = (pid % num_m) * BLOCK_M, (pid // num_m) * BLOCK_N
    k0 = split * K_SPLIT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k0, k0 + K_SPLIT, BLOCK_K):
        acc = tl.dot(a_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    ptrs = part_ptr + split.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(ptrs, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def vision_attention_kernel(qkv_ptr, out_ptr, T, stride_qkv, stride_out, scale,
                            HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """Program (image · HEADS + head, query block): softmax(q·kᵀ · scale)·v over the image's T
    tokens (all in one block: BLOCK_T ≥ T). qkv rows [N·T, 3·HEADS·HD] are (q | k | v), each head
    after head; out rows [N·T, HEADS·HD] the same head order. The scores are float32; P is rounded
    to v's dtype for P·v and the sum divides the output once, as flash attention does."""
    image = tl.program_id(0) // HEADS
    head = tl.program_id(0) % HEADS
    q_rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    keys = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    base = qkv_ptr + (image * T).to(tl.int64) * stride_qkv + head * HD
    q_mask = (q_rows < T)[:, None] & (d < HD)[None, :]
    k_mask = (keys < T)[:, None] & (d < HD)[None, :]
    q = tl.load(base + q_rows[:, None] * stride_qkv + d[None, :], mask=q_mask, other=0.0)
    k = tl.load(base + HEADS * HD + keys[:, None] * stride_qkv + d[None, :], mask=k_mask, other=0.0)
    v = tl.load(base + 2 * HEADS * HD + keys[:, None] * stride_qkv + d[None, :], mask=k_mask, other=0.0)
    s = tl.dot(q, k.T) * scale
    s = tl.where((keys < T)[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    o = tl.dot(p.to(v.dtype), v) / tl.sum(p, axis=1)[:, None]
    dst = out_ptr + (image * T + q_rows)[:, None].to(tl.int64) * stride_out + head * HD + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=q_mask)
