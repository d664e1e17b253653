"""Probe (run 71): the FP8 prefix MLP's GEMMs on TMA tensor descriptors, against cuBLASLt and the
pointer-based kernels of `bench/fp8_mlp_kernels.py`; and the whole-MLP error as
`bench/fp8_mlp_check.py --full` computes it, step by step.

    PYTHONPATH=. python bench/fp8_tma_probe.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench import fp8_mlp_kernels as M
from bench.fp8_mlp_kernels import gate_up_tma_sums, geglu_e4m3_epilogue
from pi0_policy_ros.engine.weights import quantize_rows


@triton.jit
def gate_up_tma_kernel(x_desc, sx_ptr, w_desc, sw_ptr, out_ptr, so_ptr, P, K, MLP, stride_out, stride_so,
                       FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr, BLOCK_K: tl.constexpr):
    num_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    pid_m, group = pid % num_m, pid // num_m
    off_m, off_n = pid_m * BLOCK_M, group * GROUP_N
    acc_g, acc_u = gate_up_tma_sums(x_desc, w_desc, off_m, off_n, K, MLP, BLOCK_M, GROUP_N, BLOCK_K)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, GROUP_N)
    geglu_e4m3_epilogue(acc_g, acc_u, rm, rn, group, P, MLP, sx_ptr, sw_ptr, out_ptr, so_ptr, stride_out,
                           stride_so, FP8_MAX)


@triton.jit
def down_tma_kernel(a_desc, sa_ptr, w_desc, sw_ptr, acc_ptr, P, N, K, stride_sa, stride_acc,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr, SPLITS: tl.constexpr,
                    ROW_SCALED: tl.constexpr):
    num_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    pid_m, pid_n = pid % num_m, pid // num_m
    off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
    k_len = K // SPLITS
    k0 = tl.program_id(1) * k_len
    rm = off_m + tl.arange(0, BLOCK_M)
    rows_ok = rm < P
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k0, k0 + k_len, GROUP_K):
        a = a_desc.load([off_m, k])
        w = w_desc.load([off_n, k])
        if ROW_SCALED:
            acc = tl.dot(a, w.T, acc)
        else:
            s = tl.load(sa_ptr + rm * stride_sa + k // GROUP_K, mask=rows_ok, other=0.0)
            acc += tl.dot(a, w.T) * s[:, None]
    if ROW_SCALED:
        acc = acc * tl.load(sa_ptr + rm * stride_sa, mask=rows_ok, other=0.0)[:, None]
    rn = off_n + tl.arange(0, BLOCK_N)
    acc = acc * tl.load(sw_ptr + rn)[None, :]
    tl.atomic_add(acc_ptr + rm[:, None] * stride_acc + rn[None, :], acc, mask=rows_ok[:, None], sem="relaxed")


def timed_us(fn, n: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    dev = torch.device("cuda")
    P, W, MLP = 544, 2048, 16384
    gu, dn, x0 = M.probe_layer(dev, P, W, MLP)
    # the whole-MLP error, as the check computes it, step by step
    fp = M.Fp8Mlp(P, W, MLP, dev)
    want_h = F.rms_norm(x0.float(), (W,), eps=1e-6)
    y = want_h @ (gu.weight.float() * gu.scale.t()).t()
    update = (F.gelu(y[:, :MLP], approximate="tanh") * y[:, MLP:]) @ (dn.weight.float() * dn.scale.t()).t()
    x = x0.clone()
    fp(x, gu, dn, 1e-6)
    acc = fp.acc.clone()
    print("acc vs update", ((acc - update).abs().max() / update.abs().max()).item())
    fp.norm(x, 1e-6, fold=True)
    print("x - x0 vs acc", ((x.float() - x0.float()) - acc).abs().max().item(), "update max", update.abs().max().item())
    print("x - x0 vs update", (((x.float() - x0.float()) - update).abs().max() / update.abs().max()).item())
    hq, hs = quantize_rows(want_h)
    act, asc = M.gate_up_geglu_reference(hq, hs, gu)
    bm, splits = 128, 4
    for bm in (128, 64):
        for stages in (3, 4, 5):
            x_desc = TensorDescriptor.from_tensor(hq, [bm, 128])
            w_desc = TensorDescriptor.from_tensor(gu.weight, [128, 128])
            out = torch.empty(P, MLP, dtype=torch.float8_e4m3fn, device=dev)
            so = torch.empty(P, MLP // 128, device=dev)
            f = lambda: gate_up_tma_kernel[(triton.cdiv(P, bm) * 128,)](
                x_desc, hs, w_desc, gu.scale, out, so, P, W, MLP, out.stride(0), so.stride(0), FP8_MAX=448.0,
                BLOCK_M=bm, GROUP_N=128, BLOCK_K=128, num_warps=8 if bm == 128 else 4, num_stages=stages)
            try:
                us = timed_us(f)
                err = ((out.float().view(P, -1, 128) * so[..., None]).view(P, MLP)
                       - (act.float().view(P, -1, 128) * asc[..., None]).view(P, MLP)).abs().max().item()
                print(f"gate_up tma bm{bm} s{stages}: {us:.1f} us, err {err:.3f}")
            except Exception as exc:  # noqa: BLE001 - a probe
                print(f"gate_up tma bm{bm} s{stages}: {type(exc).__name__} {str(exc)[:100]}")
    want = M.down_reference(act, asc, dn)
    for row_scaled in (False, True):
        for bm, bn, splits, stages in ((128, 128, 4, 4), (128, 128, 2, 4), (128, 128, 4, 3), (64, 128, 4, 4),
                                       (128, 256, 2, 3), (128, 128, 1, 4)):
            a_desc = TensorDescriptor.from_tensor(act, [bm, 128])
            w_desc = TensorDescriptor.from_tensor(dn.weight, [bn, 128])
            acc = torch.zeros(P, W, device=dev)
            f = lambda: down_tma_kernel[(triton.cdiv(P, bm) * (W // bn), splits)](
                a_desc, asc, w_desc, dn.scale, acc, P, W, MLP, asc.stride(0), acc.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                GROUP_K=128, SPLITS=splits, ROW_SCALED=row_scaled, num_warps=8 if bm == 128 else 4,
                num_stages=stages)
            try:
                f()
                err = ((acc - want).abs().max() / want.abs().max()).item()
                us = timed_us(f)
                print(f"down tma row_scaled={row_scaled} bm{bm} bn{bn} k{splits} s{stages}: {us:.1f} us, "
                      f"err {err:.2e}")
            except Exception as exc:  # noqa: BLE001 - a probe
                print(f"down tma bm{bm} bn{bn} k{splits} s{stages}: {type(exc).__name__} {str(exc)[:100]}")
    row_scale = asc[:, :1].contiguous()
    print(f"cublas gate_up {timed_us(lambda: torch._scaled_mm(hq, gu.weight.t(), scale_a=hs, scale_b=gu.scale, out_dtype=torch.bfloat16, use_fast_accum=True)):.1f} us")
    print(f"cublas down {timed_us(lambda: torch._scaled_mm(act, dn.weight.t(), scale_a=row_scale, scale_b=dn.scale, out_dtype=torch.bfloat16)):.1f} us")
    print(f"fused pointer mlp {timed_us(lambda: fp(x, gu, dn, 1e-6)):.1f} us")


if __name__ == "__main__":
    main()
