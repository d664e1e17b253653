"""Row-wise elementwise ops of the prefix: GEGLU and per-token FP8 quantization.

On CUDA with Triton they are single fused kernels (`kernels_triton`); elsewhere plain torch. In
torch, GEGLU is three passes over the [P, 2·mlp] activations, and quantizing its output five more;
fused, it is one read of gate/up and one write of the result.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.weights import FP8_MAX, quantize_rows as quantize_rows_torch

_BLOCK = 1024


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def geglu(gu: torch.Tensor) -> torch.Tensor:
    """gu = [gate | up] [P, 2·mlp] → gelu_tanh(gate) ⊙ up [P, mlp], gu's dtype."""
    mlp = gu.shape[1] // 2
    if not _use_triton(gu):
        return F.gelu(gu[:, :mlp], approximate="tanh") * gu[:, mlp:]
    from pi0_policy_ros.engine import kernels_triton as K
    out = torch.empty(gu.shape[0], mlp, dtype=gu.dtype, device=gu.device)
    K.geglu_rows_kernel[(gu.shape[0],)](gu, out, out, mlp, gu.stride(0), out.stride(0),
                                        QUANT=False, FP8_MAX=FP8_MAX, BLOCK=_BLOCK, num_warps=4)
    return out


def geglu_quantized(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GEGLU straight to per-row e4m3: (q [P, mlp], scale [P, 1] float32)."""
    if not _use_triton(gu):
        return quantize_rows(geglu(gu))
    from pi0_policy_ros.engine import kernels_triton as K
    mlp = gu.shape[1] // 2
    out = torch.empty(gu.shape[0], mlp, dtype=torch.float8_e4m3fn, device=gu.device)
    scale = torch.empty(gu.shape[0], 1, dtype=torch.float32, device=gu.device)
    K.geglu_rows_kernel[(gu.shape[0],)](gu, out, scale, mlp, gu.stride(0), out.stride(0),
                                        QUANT=True, FP8_MAX=FP8_MAX, BLOCK=_BLOCK, num_warps=4)
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
