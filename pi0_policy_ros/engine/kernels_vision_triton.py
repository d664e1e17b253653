"""SigLIP's attention as one Triton kernel (`rowops.vision_attention` dispatches to it).

`vision_attention_kernel`: the attention per (image, head) with all of an image's 256 keys in one
block, reading q, k and v straight from the fused qkv rows and writing the out projection's row
layout. On the H100 (notes attempt 53): 7.9 µs a layer against 9.2-9.4 for torch's SDPA (cuDNN) on
the permuted views; vision 1.67-1.70 → 1.62-1.64 ms in the bench (run 158). A form splitting a
head's 72 columns as 64 + 16 for the MMAs (instead of padding them to 128) made illegal memory
accesses on the H100 at SigLIP's size (run 156) and is not kept.
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
