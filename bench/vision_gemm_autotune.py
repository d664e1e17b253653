"""Is there headroom in the vision stage's GEMMs? Times cuBLAS (what the engine runs) for SigLIP's
four linears at the bench's 512 rows (two images), and lets inductor's max-autotune time its Triton
GEMM templates on the same shapes: its AUTOTUNE table (stderr) lists every choice against cuBLAS.

    PYTHONPATH=. python3 bench/vision_gemm_autotune.py [--rows 512] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench.graph_timing import graph_time_us

# SigLIP So400m/14: width 1152, MLP 4304, fused qkv 3 × 1152.
SHAPES = {"qkv": (1152, 3456), "out": (1152, 1152), "fc1": (1152, 4304), "fc2": (4304, 1152)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result: dict[str, dict[str, float]] = {}
    for name, (k, n) in SHAPES.items():
        layers = 8  # distinct weights, so that they do not all sit in L2
        xs = [torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(layers)]
        flops = 2.0 * args.rows * k * n
        cublas_us, ref = graph_time_us(lambda i: F.linear(xs[i % layers], ws[i % layers]), layers)
        tuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        tuned(xs[0], ws[0])
        tuned_us, out = graph_time_us(lambda i: tuned(xs[i % layers], ws[i % layers]), layers)
        err = (out.float() - ref.float()).abs().max().item()
        result[name] = {"k": k, "n": n, "cublas_us": round(cublas_us, 2), "autotuned_us": round(tuned_us, 2),
                        "cublas_tflops": round(flops / cublas_us / 1e6, 1),
                        "autotuned_tflops": round(flops / tuned_us / 1e6, 1), "max_abs_diff": err}
        print(name, result[name], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": args.rows, "shapes": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
