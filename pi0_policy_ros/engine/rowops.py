"""Row-wise elementwise ops of vision and prefix: the residual add + LayerNorm of SigLIP, RoPE of the
fused QKV output into q and the K/V cache, GEGLU, and per-token FP8 quantization; and the FP8
prefix's down projection with the residual add in its epilogue.

On CUDA with Triton they are single fused kernels (`kernels_triton`); elsewhere plain torch. In
torch, GEGLU is three passes over the [P, 2·mlp] activations, and quantizing its output five more;
fused, it is one read of gate/up and one write of the result. RoPE in torch is ~10 kernels a layer
(two rotations, their concatenations, the cache copies); fused, one.
The `*_triton` functions take any tensors Triton can address (the CPU under TRITON_INTERPRET=1
too: `test/triton_prefix_check.py`); the dispatchers pick them on CUDA only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.types import hopper_or_newer
from pi0_policy_ros.engine.weights import FP8_MAX, Linear, fp8_linear, quantize_rows as quantize_rows_torch

_BLOCK = 1024
_ONE_PASS_MAX = 16384  # GEGLU + quantization keeps rows up to this long in registers (16 warps)
# fp8_linear_residual's tiles (BLOCK_M, BLOCK_N, BLOCK_K), warps, stages: Gemma's down projection at
# 544 rows in 45 µs against 59 for cuBLASLt + the add (H100, `bench/prefix_mlp_probe.py`, run 78)
_FP8_RESIDUAL_CONFIG = ((64, 128, 128), 4, 4)
# vision_attention_triton's query rows a program and warps: 7.9 µs a SigLIP layer, against 8.8-18.7
# for 64 / 128 rows on 4 / 8 warps otherwise (H100, `bench/vision_micro.py`, run 157)
VISION_ATTENTION_BLOCK_Q, VISION_ATTENTION_WARPS = 64, 4


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def residual_layer_norm(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x ← x + y + bias in place (x [P, W], y [P, W], bias [W]); returns LayerNorm(x) without gain
    or shift. Fused on CUDA: one read of x and y instead of an add, a bias add and a norm pass."""
    if _use_triton(x):
        return residual_layer_norm_triton(x, y, bias, eps)
    x += y + bias
    return F.layer_norm(x, (x.shape[1],), eps=eps)


def residual_layer_norm_triton(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    import triton

    from pi0_policy_ros.engine import kernels_triton as K
    h = torch.empty_like(x)
    K.residual_layer_norm_rows_kernel[(x.shape[0],)](x, y, bias, h, x.shape[1], x.stride(0), y.stride(0),
                                                     h.stride(0), eps, BLOCK=triton.next_power_of_2(x.shape[1]),
                                                     num_warps=4)
    return h


def vision_attention(qkv: torch.Tensor, images: int, heads: int) -> torch.Tensor:
    """SigLIP's attention from the fused qkv rows [images·T, 3·heads·hd] (q | k | v, head after
    head) to rows [images·T, heads·hd]. One Triton kernel on sm_90 in half precision with T ≤ 256
    (`kernels_vision_triton`): measured faster than SDPA there (the H100) and nowhere else yet;
    elsewhere torch's SDPA on the permuted views."""
    t, hd = _tokens_and_head_dim(qkv, images, heads)
    if (_use_triton(qkv) and torch.cuda.get_device_capability(qkv.device) == (9, 0)
            and qkv.dtype in (torch.bfloat16, torch.float16) and t <= 256 and hd <= 128):
        return vision_attention_triton(qkv, images, heads)
    return vision_attention_torch(qkv, images, heads)


def _tokens_and_head_dim(qkv: torch.Tensor, images: int, heads: int) -> tuple[int, int]:
    """Tokens an image and columns a head of fused qkv rows [images·T, 3·heads·hd]."""
    return qkv.shape[0] // images, qkv.shape[1] // (3 * heads)


def vision_attention_torch(qkv: torch.Tensor, images: int, heads: int) -> torch.Tensor:
    rows = qkv.shape[0]
    t, hd = _tokens_and_head_dim(qkv, images, heads)
    q, k, v = qkv.view(images, t, 3, heads, hd).permute(2, 0, 3, 1, 4)  # [images, heads, T, hd] each
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, heads * hd)


def vision_attention_triton(qkv: torch.Tensor, images: int, heads: int, block_q: int = VISION_ATTENTION_BLOCK_Q,
                            warps: int = VISION_ATTENTION_WARPS) -> torch.Tensor:
    import triton

    from pi0_policy_ros.engine import kernels_vision_triton as KV
    rows = qkv.shape[0]
    t, hd = _tokens_and_head_dim(qkv, images, heads)
    out = torch.empty(rows, heads * hd, dtype=qkv.dtype, device=qkv.device)
    KV.vision_attention_kernel[(images * heads, triton.cdiv(t, block_q))](
        qkv, out, t, qkv.stride(0), out.stride(0), hd**-0.5, HEADS=heads, HD=hd, BLOCK_Q=block_q,
        BLOCK_T=max(16, triton.next_power_of_2(t)), BLOCK_D=max(16, triton.next_power_of_2(hd)), num_warps=warps)
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half convention. x [..., hd]; cos/sin broadcastable to x."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, k_out: torch.Tensor,
             v_out: torch.Tensor) -> torch.Tensor | None:
    """qkv [P, (heads + 2)·hd] (heads = 0: K/V only) → RoPE'd k and v written to `k_out` / `v_out`
    [P, hd]; returns RoPE'd q [P, heads·hd] (None when heads = 0)."""
    if _use_triton(qkv):
        return rope_qkv_triton(qkv, cos, sin, heads, k_out, v_out)
    p, hd = qkv.shape[0], k_out.shape[1]
    q_cols = heads * hd
    k_out.copy_(rotate(qkv[:, q_cols: q_cols + hd], cos, sin))
    v_out.copy_(qkv[:, q_cols + hd: q_cols + 2 * hd])
    if not heads:
        return None
    return rotate(qkv[:, :q_cols].view(p, heads, hd), cos[:, None], sin[:, None]).reshape(p, q_cols)


def rope_qkv_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, k_out: torch.Tensor,
                    v_out: torch.Tensor) -> torch.Tensor | None:
    from pi0_policy_ros.engine import kernels_triton as K
    p, hd = qkv.shape[0], k_out.shape[1]
    q = torch.empty(p, max(heads, 1) * hd, dtype=k_out.dtype, device=qkv.device)
    block_p = 32
    K.rope_qkv_rows_kernel[((p + block_p - 1) // block_p, heads + 2)](
        qkv, qkv.stride(0), cos, sin, q, k_out, v_out, p, NQ=heads, HD=hd, BLOCK_P=block_p, num_warps=4)
    return q if heads else None


def geglu(gu: torch.Tensor) -> torch.Tensor:
    """gu = [gate | up] [P, 2·mlp] → gelu_tanh(gate) ⊙ up [P, mlp], gu's dtype."""
    if _use_triton(gu):
        return geglu_triton(gu)
    mlp = gu.shape[1] // 2
    return F.gelu(gu[:, :mlp], approximate="tanh") * gu[:, mlp:]


def geglu_triton(gu: torch.Tensor) -> torch.Tensor:
    from pi0_policy_ros.engine import kernels_triton as K
    mlp = gu.shape[1] // 2
    out = torch.empty(gu.shape[0], mlp, dtype=gu.dtype, device=gu.device)
    # 4096 columns a step on 8 warps: 26.6 → 20.1 µs on the [544, 2·16384] rows (H100, notes attempt 14)
    K.geglu_rows_kernel[(gu.shape[0],)](gu, out, out, mlp, gu.stride(0), out.stride(0),
                                        QUANT=False, FP8_MAX=FP8_MAX, BLOCK=4 * _BLOCK, ONE_PASS=False, num_warps=8)
    return out


def geglu_quantized(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GEGLU straight to per-row e4m3: (q [P, mlp], scale [P, 1] float32)."""
    if _use_triton(gu):
        return geglu_quantized_triton(gu)
    return quantize_rows(geglu(gu))


def geglu_quantized_triton(gu: torch.Tensor, one_pass: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`one_pass` None: whenever the row fits (`_ONE_PASS_MAX`); the two-pass form otherwise."""
    import triton

    from pi0_policy_ros.engine import kernels_triton as K
    mlp = gu.shape[1] // 2
    row_block = triton.next_power_of_2(mlp)
    one_pass = row_block <= _ONE_PASS_MAX if one_pass is None else one_pass
    out = torch.empty(gu.shape[0], mlp, dtype=torch.float8_e4m3fn, device=gu.device)
    scale = torch.empty(gu.shape[0], 1, dtype=torch.float32, device=gu.device)
    K.geglu_rows_kernel[(gu.shape[0],)](gu, out, scale, mlp, gu.stride(0), out.stride(0),
                                        QUANT=True, FP8_MAX=FP8_MAX, BLOCK=row_block if one_pass else _BLOCK,
                                        ONE_PASS=one_pass, num_warps=max(4, min(16, row_block // 1024))
                                        if one_pass else 4)
    return out, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3: (q [M, K], scale [M, 1] float32) with x ≈ q · scale."""
    if not _use_triton(x):
        return quantize_rows_torch(x)
    from pi0_policy_ros.engine import kernels_triton as K
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    K.quantize_rows_kernel[(x.shape[0],)](x, out, scale, x.shape[1], x.stride(0), out.stride(0),
                                          FP8_MAX=FP8_MAX, BLOCK=_BLOCK, num_warps=4)
    return out, scale


def fp8_linear_residual(x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor], lin: Linear) -> None:
    """x += (xq · sx) · (W · sw)ᵀ in place, for e4m3 rows `quantized` = (xq [P, K], sx [P, 1]) and an
    FP8 `lin` without bias. On Hopper and newer one Triton kernel with the add in its epilogue (TMA
    loads; one rounding of x); elsewhere cuBLASLt's row-scaled GEMM and an add."""
    xq, sx = quantized
    # TMA reads whole rows of 16-byte multiples: contiguous e4m3 rows of K % 16 == 0 bytes
    tma_ok = xq.is_contiguous() and lin.weight.is_contiguous() and xq.shape[1] % 16 == 0
    if _use_triton(x) and hopper_or_newer(x.device) and tma_ok and lin.bias is None and x.stride(1) == 1:
        fp8_linear_residual_triton(x, xq, sx, lin)
    else:
        x += fp8_linear(xq, lin, quantized)


def fp8_linear_residual_triton(x: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor, lin: Linear) -> None:
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from pi0_policy_ros.engine import kernels_triton as K
    (bm, bn, bk), warps, stages = _FP8_RESIDUAL_CONFIG
    p, n = x.shape
    K.fp8_linear_residual_kernel[(triton.cdiv(p, bm) * triton.cdiv(n, bn),)](
        TensorDescriptor.from_tensor(xq, [bm, bk]), sx, TensorDescriptor.from_tensor(lin.weight, [bn, bk]),
        lin.scale, x, p, n, xq.shape[1], x.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages)
