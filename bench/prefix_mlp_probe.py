"""Run 78: two prefix-MLP kernels that might pay, each against what the engine runs now (cuBLASLt),
one Gemma-2B layer at 544 rows, CUDA graphs of 16 calls cycling over 4 layers' weights (so they
stream from HBM as in the prefix), median of 20 replays, µs per call:

- FP8 down with the residual in its epilogue (TMA loads, one scale per activation row as the
  engine's GEGLU kernel writes them, no split-K so each output tile is one program's: x += y in
  place, no workspace): against `_scaled_mm` + the add. Since run 78 this is the engine's
  `kernels_triton.fp8_linear_residual_kernel` (the probe's kernel plus a column mask);
- bf16 gate_up with GEGLU in its epilogue (TMA): against cuBLAS gate_up + the GEGLU row kernel.

    PYTHONPATH=. python bench/prefix_mlp_probe.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench.fp8_mlp_kernels import gate_up_tma_sums
from bench.graph_timing import graph_time_us
from pi0_policy_ros.engine import kernels_triton as K
from pi0_policy_ros.engine import rowops
from pi0_policy_ros.engine.kernels_triton import _gelu_tanh
from pi0_policy_ros.engine.weights import Linear, fp8_linear, to_fp8

ROWS, WIDTH, MLP, LAYERS, CALLS = 544, 2048, 16384, 4, 16


@triton.jit
def gate_up_geglu_bf16_kernel(x_desc, w_desc, out_ptr, P, K, MLP, stride_out,
                              BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[P, MLP] = gelu_tanh(x · W_gateᵀ) ⊙ (x · W_upᵀ), W = [gate; up] [2·MLP, K], bf16."""
    num_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    off_m, off_n = (pid % num_m) * BLOCK_M, (pid // num_m) * GROUP_N
    acc_g, acc_u = gate_up_tma_sums(x_desc, w_desc, off_m, off_n, K, MLP, BLOCK_M, GROUP_N, BLOCK_K)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, GROUP_N)
    act = _gelu_tanh(acc_g) * acc_u
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_out + rn[None, :], act.to(out_ptr.dtype.element_ty),
             mask=(rm < P)[:, None])


def graph_us(fn) -> float:
    """µs per call of fn(i), i = 0..CALLS-1, captured in one graph."""
    return graph_time_us(fn, CALLS, replays=20)[0]


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(dev), flush=True)
    # FP8 down: the engine's input (GEGLU → per-row e4m3) and weights
    downs = [to_fp8(Linear(torch.randn(WIDTH, MLP, device=dev, dtype=torch.bfloat16) / MLP**0.5))
             for _ in range(LAYERS)]
    gu = torch.randn(ROWS, 2 * MLP, device=dev, dtype=torch.bfloat16)
    aq, sa = rowops.geglu_quantized(gu)
    x0 = torch.randn(ROWS, WIDTH, device=dev).mul_(4).to(torch.bfloat16)
    x = x0.clone()
    print(f"fp8 down: cuBLASLt + add {graph_us(lambda i: x.add_(fp8_linear(gu, downs[i % LAYERS], (aq, sa)))):.1f}",
          flush=True)
    want = x0.float() + fp8_linear(gu, downs[0], (aq, sa)).float()
    for bm, bn, stages, warps in ((128, 128, 4, 8), (128, 128, 3, 8), (128, 256, 3, 8), (64, 128, 4, 4),
                                  (64, 256, 3, 8), (128, 64, 4, 4)):
        a_desc = TensorDescriptor.from_tensor(aq, [bm, 128])
        w_descs = [TensorDescriptor.from_tensor(d.weight, [bn, 128]) for d in downs]

        def run(i: int, x: torch.Tensor) -> None:
            K.fp8_linear_residual_kernel[(triton.cdiv(ROWS, bm) * (WIDTH // bn),)](
                a_desc, sa, w_descs[i % LAYERS], downs[i % LAYERS].scale, x, ROWS, WIDTH, MLP, x.stride(0),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=warps, num_stages=stages)

        try:
            xc = x0.clone()
            run(0, xc)
            err = float((xc.float() - want).abs().max())
            print(f"fp8 down residual tma bm{bm} bn{bn} s{stages} w{warps}: {graph_us(lambda i: run(i, x)):.1f}  "
                  f"(max |Δ| to cuBLASLt + add in float32: {err:.3f})", flush=True)
        except Exception as exc:  # noqa: BLE001 - a probe
            print(f"fp8 down residual tma bm{bm} bn{bn} s{stages}: {type(exc).__name__} {str(exc)[:90]}")
    downs.clear()  # frees the FP8 weights before the bf16 ones
    # bf16 gate_up + GEGLU
    gate_ups = [torch.randn(2 * MLP, WIDTH, device=dev, dtype=torch.bfloat16) / WIDTH**0.5 for _ in range(LAYERS)]
    h = torch.randn(ROWS, WIDTH, device=dev, dtype=torch.bfloat16)
    print(f"bf16 gate_up: cuBLAS + GEGLU kernel "
          f"{graph_us(lambda i: rowops.geglu(torch.matmul(h, gate_ups[i % LAYERS].t()))):.1f}, "
          f"cuBLAS alone {graph_us(lambda i: torch.matmul(h, gate_ups[i % LAYERS].t())):.1f}", flush=True)
    want = rowops.geglu(torch.matmul(h, gate_ups[0].t())).float()
    out = torch.empty(ROWS, MLP, device=dev, dtype=torch.bfloat16)
    for bm, bk, stages, warps in ((128, 64, 4, 8), (128, 64, 3, 8), (64, 64, 4, 4), (128, 32, 5, 8)):
        x_desc = TensorDescriptor.from_tensor(h, [bm, bk])
        w_descs = [TensorDescriptor.from_tensor(w, [128, bk]) for w in gate_ups]

        def run_gu(i: int) -> None:
            gate_up_geglu_bf16_kernel[(triton.cdiv(ROWS, bm) * (MLP // 128),)](
                x_desc, w_descs[i % LAYERS], out, ROWS, WIDTH, MLP, out.stride(0), BLOCK_M=bm, GROUP_N=128,
                BLOCK_K=bk, num_warps=warps, num_stages=stages)

        try:
            run_gu(0)
            err = float((out.float() - want).abs().max() / want.abs().max())
            print(f"bf16 gate_up+geglu tma bm{bm} bk{bk} s{stages} w{warps}: {graph_us(run_gu):.1f}  "
                  f"(relative max |Δ| to cuBLAS + GEGLU: {err:.1e})", flush=True)
        except Exception as exc:  # noqa: BLE001 - a probe
            print(f"bf16 gate_up+geglu tma bm{bm} bk{bk} s{stages}: {type(exc).__name__} {str(exc)[:90]}")


if __name__ == "__main__":
    main()
