"""Triton attention kernels for the vision and prefix stages (`rowops` and `stages` dispatch to them).

`vision_attention_kernel`: SigLIP's attention per (image, head) with all of an image's 256 keys in
one block, reading q, k and v straight from the fused qkv rows and writing the out projection's
row layout. torch's SDPA (cuDNN) took 9.2 µs a layer on the H100 plus a memset; this 7.9 (notes
attempt 53). A form splitting a head's 72 columns as 64 + 16 for the MMAs (instead of padding them
to 128) made illegal memory accesses on the H100 at SigLIP's size (run 156) and is not kept.

`prefix_attention_kernel`: PaliGemma's prefix attention, the 8 query heads as rows of the one KV
head, flash-style over blocks of keys with the additive key mask. torch's flash varlen runs 64-row
query tiles: 68 programs for 132 SMs at the bench's 544 rows (notes attempt 32); smaller row blocks
fill the machine.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def vision_attention_kernel(qkv_ptr, out_ptr, T, stride_qkv, stride_out, scale,
                            HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """Program (image · HEADS + head, query block): softmax(q·kᵀ · scale)·v over the image's T
    tokens (all in one block: BLOCK_T ≥ T). qkv rows [N·T, 3·HEADS·HD] are (q | k | v), each head
    after head; out rows [N·T, HEADS·HD] the same head order; a head's HD columns are padded to
    BLOCK_D with zeros. The scores are float32; P is rounded to v's dtype for P·v and the sum
    divides the output once, as flash attention does."""
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


@triton.jit
def prefix_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, R, P, stride_kv, scale,
                            HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (block of BLOCK_M query rows): softmax(q·kᵀ · scale + bias)·v over the P keys, with
    an online softmax over blocks of BLOCK_N keys. q rows [R, HD] (contiguous: the query heads as
    rows of the one KV head), keys and values [P, HD] (rows stride_kv apart), bias [P] the additive
    key mask (0 or the model's large negative mask value), out rows [R, HD]. At least one key must
    be unmasked (the prefix always has one)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    row_ok = (rows < R)[:, None]
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * HD + d[None, :], mask=row_ok, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    for k0 in range(0, P, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        key_ok = keys < P
        k = tl.load(k_ptr + keys[:, None] * stride_kv + d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + keys[:, None] * stride_kv + d[None, :], mask=key_ok[:, None], other=0.0)
        bias = tl.load(bias_ptr + keys, mask=key_ok, other=float("-inf")).to(tl.float32)
        s = tl.dot(q, k.T) * scale + bias[None, :]
        # the running max, taken as 0 while every key so far is masked by -inf (float16's mask
        # value): then alpha and p are 0 instead of NaN. bfloat16's finite mask value gives the
        # masked keys weight until a real score arrives, and alpha = 0 then drops them.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)  # 0 on the first block (m = -inf)
        p = tl.exp(s - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(out_ptr + rows[:, None].to(tl.int64) * HD + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok)
