"""The prefix's FP8 MLP, one Gemma-2B layer at full width (run 68): cuBLASLt's row-scaled GEMMs (the
engine's path) against the probe kernels of `bench/fp8_mlp_kernels.py`, with candidate tile configs.

    PYTHONPATH=. python bench/fp8_mlp_micro.py [--rows 544 968] [--json OUT]

Per row count: the time of one layer's MLP with its norms (both paths as the prefix stage runs
them), each kernel alone per candidate config, and the error of each path's residual update
against float32 math on the unquantized weights. Times: CUDA graphs of 16 calls cycling over 4
layers' weights (384 MB of e4m3, so the weights stream from HBM as in the prefix), median of 30
replays, per call.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine import rowops
from bench.fp8_mlp_kernels import Fp8Mlp, Fp8MlpConfig
from bench.graph_timing import graph_time_us
from pi0_policy_ros.engine.weights import Linear, fp8_linear, to_fp8

WIDTH, MLP, LAYERS, CALLS, EPS = 2048, 16384, 4, 16, 1e-6
GATE_UP = [(128, 8, 3), (128, 8, 4), (128, 8, 2), (64, 4, 3), (64, 4, 4), (64, 8, 4)]  # block_m, warps, stages
DOWN = [(128, 128, 4, 8, 4), (128, 128, 8, 8, 4), (128, 128, 2, 8, 4), (128, 128, 4, 8, 3), (128, 128, 16, 8, 4),
        (64, 128, 4, 4, 4), (64, 128, 8, 4, 4), (128, 256, 8, 8, 3), (128, 64, 4, 4, 4), (64, 256, 4, 8, 3)]


def graph_time(fn: Callable[[int], None], calls: int = CALLS) -> float:
    """ms per call of fn(i), i = 0..calls-1, captured in one graph."""
    return graph_time_us(fn, calls)[0] / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[544, 968])
    parser.add_argument("--json")
    args = parser.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bf = [(Linear(torch.randn(2 * MLP, WIDTH, device=dev, dtype=torch.bfloat16) / WIDTH**0.5),
           Linear(torch.randn(WIDTH, MLP, device=dev, dtype=torch.bfloat16) / MLP**0.5)) for _ in range(LAYERS)]
    fp8 = [(to_fp8(g, fast_accum=True), to_fp8(d)) for g, d in bf]
    out: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": {}}
    for p in args.rows:
        x0 = torch.randn(p, WIDTH, device=dev).mul_(4).to(torch.bfloat16)
        res: dict = {}

        def baseline(i: int, x: torch.Tensor) -> None:
            gu, dn = fp8[i % LAYERS]
            F.rms_norm(x, (WIDTH,), eps=EPS)  # the layer's first norm (its output feeds qkv)
            g = fp8_linear(F.rms_norm(x, (WIDTH,), eps=EPS), gu)
            x += fp8_linear(g, dn, quantized=rowops.geglu_quantized(g))

        x = x0.clone()
        res["layer_cublas_ms"] = graph_time(lambda i: baseline(i, x))
        mlp = Fp8Mlp(p, WIDTH, MLP, dev)

        def fused(i: int, x: torch.Tensor) -> None:
            gu, dn = fp8[i % LAYERS]
            mlp.norm(x, EPS, fold=True)
            mlp(x, gu, dn, EPS)

        x = x0.clone()
        res["layer_fused_ms"] = graph_time(lambda i: fused(i, x))
        # the parts of the cuBLAS path
        h = F.rms_norm(x0, (WIDTH,), eps=EPS)
        hq, hs = rowops.quantize_rows(h)
        g = fp8_linear(h, fp8[0][0])
        act = rowops.geglu_quantized(g)
        res["cublas_gate_up_ms"] = graph_time(lambda i: fp8_linear(h, fp8[i % LAYERS][0], quantized=(hq, hs)))
        res["cublas_geglu_quant_ms"] = graph_time(lambda i: rowops.geglu_quantized(g))
        res["cublas_down_add_ms"] = graph_time(
            lambda i: x.add_(fp8_linear(g, fp8[i % LAYERS][1], quantized=act)))
        res["norm_quant_ms"] = graph_time(lambda i: rowops.quantize_rows(F.rms_norm(x, (WIDTH,), eps=EPS)))
        # the fused kernels, per config (each runs the whole MLP, so the other kernel is subtracted)
        res["gate_up_configs"], res["down_configs"] = {}, {}
        for bm, warps, stages in GATE_UP:
            cfg = Fp8MlpConfig(gate_up_block_m=bm, gate_up_warps=warps, gate_up_stages=stages)
            m = Fp8Mlp(p, WIDTH, MLP, dev, cfg)
            res["gate_up_configs"][f"bm{bm}_w{warps}_s{stages}"] = graph_time(
                lambda i: m(x, *fp8[i % LAYERS], EPS))
        for bm, bn, splits, warps, stages in DOWN:
            cfg = Fp8MlpConfig(down_block_m=bm, down_block_n=bn, down_splits=splits, down_warps=warps,
                               down_stages=stages)
            m = Fp8Mlp(p, WIDTH, MLP, dev, cfg)
            res["down_configs"][f"bm{bm}_bn{bn}_k{splits}_w{warps}_s{stages}"] = graph_time(
                lambda i: m(x, *fp8[i % LAYERS], EPS))
        # error of one layer's update against float32 math on the unquantized weights
        gu32, dn32 = (bf[0][0].weight.float(), bf[0][1].weight.float())
        hx = F.rms_norm(x0.float(), (WIDTH,), eps=EPS)
        y = hx @ gu32.t()
        exact = x0.float() + (F.gelu(y[:, :MLP], approximate="tanh") * y[:, MLP:]) @ dn32.t()
        update = (exact - x0.float()).abs().max().item()
        xb = x0.clone()
        baseline(0, xb)
        xf = x0.clone()
        mlp.acc.zero_()
        fused(0, xf)
        mlp.norm(xf, EPS, fold=True)
        res["err_cublas_rel"] = (xb.float() - exact).abs().max().item() / update
        res["err_fused_rel"] = (xf.float() - exact).abs().max().item() / update
        xq = x0.clone()
        xq += ((F.gelu(y[:, :MLP], approximate="tanh") * y[:, MLP:]) @ dn32.t()).to(torch.bfloat16)
        res["err_bf16_rounding_rel"] = (xq.float() - exact).abs().max().item() / update
        out["rows"][p] = res
        print(json.dumps({p: res}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
