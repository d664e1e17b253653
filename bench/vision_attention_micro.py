"""SigLIP's attention at the benchmark's layout (2 images × 256 tokens, 16 heads of 72), per SDPA
backend: the default choice (cuDNN on the H100), flash, mem-efficient. Each is 27 calls (one per
layer) captured in a CUDA graph; the number is the median replay time per call. Outputs against
a float32 reference.

Usage (GPU machine): python3 bench/vision_attention_micro.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.graph_timing import graph_time_us

IMAGES, TOKENS, HEADS, HD = 2, 256, 16, 72


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    # the stage's layout: qkv [N·T, 3·W] viewed as [3, N, heads, T, hd]
    qkv = torch.randn(IMAGES, TOKENS, 3, HEADS, HD, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out: dict[str, dict[str, float]] = {}
    for name, backends in (("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                           ("flash", [SDPBackend.FLASH_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION])):
        def attention() -> torch.Tensor:
            if backends is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            us, got = graph_time_us(lambda _: attention(), 27)
            out[name] = {"us_per_call": us, "max_abs_vs_fp32": float((got.float() - ref).abs().max())}
            print(f"{name:<12}{us:8.1f} us  max|Δ| {out[name]['max_abs_vs_fp32']:.2e}", flush=True)
        except Exception as exc:  # a backend may not take this shape: report and go on
            out[name] = {"error": repr(exc)[:300]}
            print(f"{name:<12} error {exc!r:.200}", flush=True)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
