"""Microbenchmarks of the prefix stage's pieces at pi0.5 geometry (968 rows, Gemma 2B), for the
notes: each linear in bf16 and as FP8 `torch._scaled_mm` (row-wise scales, and tensor-wise ones:
cuBLASLt, run 130), the row quantization, and attention variants. Each number is the median of CUDA-event timings of 50 back-to-back calls.

Usage (GPU machine): python3 bench/prefix_micro.py [--rows N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.rowops import geglu, geglu_quantized, quantize_rows
from pi0_policy_ros.engine.weights import Linear, fp8_linear, to_fp8

ROWS, WIDTH, MLP, HEADS, HD = 968, 2048, 16384, 8, 256
LINEARS = {"qkv": (WIDTH, (HEADS + 2) * HD), "out": (HEADS * HD, WIDTH), "gate_up": (WIDTH, 2 * MLP),
           "down": (MLP, WIDTH)}


def time_ms(fn: Callable[[], object], reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--rows", type=int, default=ROWS, help="prefix rows (968: the full layout; 544: the bench's)")
    args = parser.parse_args()
    rows = args.rows
    torch.manual_seed(0)
    dev = torch.device("cuda")
    out: dict[str, float] = {}
    for name, (k, n) in LINEARS.items():
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        lin = Linear((torch.randn(n, k, device=dev) * k**-0.5).to(torch.bfloat16))
        lin8 = to_fp8(lin)
        xq = quantize_rows(x)
        out[f"{name}_bf16"] = time_ms(lambda: lin(x))
        out[f"{name}_fp8_mm"] = time_ms(lambda: fp8_linear(x, lin8, quantized=xq))
        out[f"{name}_fp8_mm_fast_accum"] = time_ms(lambda: torch._scaled_mm(
            xq[0], lin8.weight.t(), scale_a=xq[1], scale_b=lin8.scale, out_dtype=torch.bfloat16, use_fast_accum=True))
        one = torch.ones((), device=dev)  # tensor-wise scales (cuBLASLt), the row / column scales left to the caller
        for fast in (False, True):
            out[f"{name}_fp8_tensorwise{'_fast_accum' if fast else ''}"] = time_ms(lambda: torch._scaled_mm(
                xq[0], lin8.weight.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast))
        out[f"{name}_fp8_with_quant"] = time_ms(lambda: fp8_linear(x, lin8))
        out[f"{name}_quant"] = time_ms(lambda: quantize_rows(x))
        resid = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
        out[f"{name}_bf16_then_add"] = time_ms(lambda: resid + lin(x))
        out[f"{name}_bf16_addmm_beta"] = time_ms(lambda: torch.addmm(resid, x, lin.weight.t()))
    gu = torch.randn(rows, 2 * MLP, device=dev, dtype=torch.bfloat16)
    out["geglu"] = time_ms(lambda: geglu(gu))
    out["geglu_quant"] = time_ms(lambda: geglu_quantized(gu))
    x = torch.randn(rows, WIDTH, device=dev, dtype=torch.bfloat16)
    out["rms_norm"] = time_ms(lambda: F.rms_norm(x, (WIDTH,), eps=1e-6))
    q = torch.randn(1, HEADS, rows, HD, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(2, rows, HD, device=dev, dtype=torch.bfloat16)
    bias = torch.zeros(1, 1, 1, rows, device=dev, dtype=torch.bfloat16)
    bias[..., min(700, rows * 3 // 4):] = -2.3819763e38
    k = kv[0][None, None].expand(1, HEADS, rows, HD)
    v = kv[1][None, None].expand(1, HEADS, rows, HD)
    out["sdpa_heads_bias"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    qf = q.reshape(1, 1, HEADS * rows, HD)
    out["sdpa_folded_bias"] = time_ms(lambda: F.scaled_dot_product_attention(qf, kv[0][None, None], kv[1][None, None],
                                                                             attn_mask=bias))
    out["sdpa_heads_nomask"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    kc, vc = k.contiguous(), v.contiguous()
    out["sdpa_heads_bias_contig_kv"] = time_ms(lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias))
    for key, value in out.items():
        print(f"{key:<28}{value:8.3f} ms")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "ms": out}, f, indent=1)


if __name__ == "__main__":
    main()
