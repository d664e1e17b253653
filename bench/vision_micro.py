"""The vision stage's split-K linears and Triton attention against cuBLAS and SDPA (notes attempt 53).

1. out (K = 1152) and fc2 (K = 4304) at 512 rows, each with the residual + LayerNorm row kernel
   that follows it: cuBLAS + the row kernel against `linear_splitk_partials` + the row kernel
   summing its partials, for a sweep of tiles, splits, warps and stages (27 distinct weights per
   graph, as the stage streams them).
2. The attention of one layer: SDPA on the permuted views against `vision_attention_kernel`.
3. The whole vision stage of the bench's engine (2 valid images) as a graph, with each change
   alone, both (the best configs of 1 and 2), and cuBLASLt preferred for the baseline's GEMMs.
The prefix stage is timed with cuBLASLt preferred as well.

    PYTHONPATH=. python3 bench/vision_micro.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.chain_setup import bench_pi05_engine
from bench.graph_timing import graph_time_us
from pi0_policy_ros.engine import rowops, stages

ROWS, WIDTH, MLP, HEADS, EPS, LAYERS = 512, 1152, 4304, 16, 1e-6, 27
Config = tuple[tuple[int, int, int], int, int, int]


def splitk_configs(k: int) -> list[Config]:
    splits = (1, 2, 3) if k <= 2048 else (2, 3, 4)
    out: list[Config] = [((128, 128, 64), s, w, st) for s in splits for w in (4, 8) for st in (3, 4)]
    out += [((64, 128, 64), s, 4, st) for s in splits for st in (3, 4)]
    out += [((128, 64, 64), s, 4, 4) for s in splits]
    out += [((128, 128, 128), s, 8, 3) for s in splits]
    return out


def cublas_linear_rln(x: torch.Tensor, a: torch.Tensor, lin, eps: float, config=None) -> torch.Tensor:
    return rowops.residual_layer_norm(x, F.linear(a, lin.weight), lin.bias, eps)


def time_linears(result: dict) -> dict[str, Config]:
    best: dict[str, Config] = {}
    for name, k in (("out", WIDTH), ("fc2", MLP)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(ROWS, k, device="cuda", generator=gen).to(torch.bfloat16)
        ws = [(torch.randn(WIDTH, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16) for _ in range(LAYERS)]
        bs = [torch.randn(WIDTH, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
        x0 = torch.randn(ROWS, WIDTH, device="cuda", generator=gen).to(torch.bfloat16)
        x = x0.clone()

        def run(fn: Callable) -> float:
            us, _ = graph_time_us(lambda i: fn(x, a, ws[i % LAYERS], bs[i % LAYERS]), LAYERS)
            return us

        ref_x = x0.clone()
        ref_h = rowops.residual_layer_norm(ref_x, F.linear(a, ws[0]), bs[0], EPS)
        rows: dict[str, dict] = {"cublas": {"us": round(run(lambda x, a, w, b: rowops.residual_layer_norm(
            x, F.linear(a, w), b, EPS)), 2)}}
        for cfg in splitk_configs(k):
            def fn(x, a, w, b, cfg=cfg):
                return rowops.residual_layer_norm_triton(x, rowops.linear_splitk_partials(a, w, cfg), b, EPS)
            try:
                us = run(fn)
            except Exception as e:  # a config that does not fit (shared memory): recorded, skipped
                rows[str(cfg)] = {"error": str(e).splitlines()[0][:160]}
                continue
            got_x = x0.clone()
            got_h = fn(got_x, a, ws[0], bs[0])
            rows[str(cfg)] = {"us": round(us, 2), "h_max_diff": float((got_h.float() - ref_h.float()).abs().max()),
                              "x_max_diff": float((got_x.float() - ref_x.float()).abs().max())}
        by_name = {str(c): c for c in splitk_configs(k)}
        best_us, best_cfg = min((r["us"], c) for c, r in rows.items() if c in by_name and "us" in r)
        best[name] = by_name[best_cfg]
        result[name] = {"k": k, "variants": rows, "best": best_cfg, "best_us": best_us}
        print(name, "cublas", rows["cublas"]["us"], "best", best_cfg, best_us, flush=True)
    return best


def time_attention(result: dict) -> tuple[int, int]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    qkv = torch.randn(ROWS, 3 * WIDTH, device="cuda", generator=gen).to(torch.bfloat16)
    ref = rowops.vision_attention_torch(qkv, 2, HEADS)
    rows = {"sdpa": {"us": round(graph_time_us(lambda i: rowops.vision_attention_torch(qkv, 2, HEADS), LAYERS)[0], 2)}}
    for block_q in (32, 64, 128):
        for warps in (4, 8):
            us, out = graph_time_us(lambda i: rowops.vision_attention_triton(qkv, 2, HEADS, block_q, warps), LAYERS)
            rows[f"triton q{block_q} w{warps}"] = {"us": round(us, 2), "max_diff": float((out.float() - ref.float())
                                                                                        .abs().max()),
                                                   "block_q": block_q, "warps": warps}
    best = min((r["us"], n) for n, r in rows.items() if n != "sdpa")[1]
    result["attention"] = {"variants": rows, "best": best}
    print("attention", rows, flush=True)
    return rows[best]["block_q"], rows[best]["warps"]


def time_stage(result: dict, best: dict[str, Config], attention: tuple[int, int]) -> None:
    engine = bench_pi05_engine()
    buf, rows = engine.buf, engine.last_prefix_rows
    block_q, warps = attention
    rowops._SPLITK_CONFIGS.update(short=best["out"], long=best["fc2"])

    def triton_attention(qkv, images, heads):
        return rowops.vision_attention_triton(qkv, images, heads, block_q, warps)

    variants = {
        "cublas+sdpa": (rowops.vision_attention_torch, cublas_linear_rln),
        "splitk": (rowops.vision_attention_torch, rowops.linear_residual_layer_norm),
        "attention": (triton_attention, cublas_linear_rln),
        "both": (triton_attention, rowops.linear_residual_layer_norm),
    }
    out: dict[str, dict] = {}
    ref = None
    for _ in range(2):  # two rounds, interleaved, to see the drift between them
        for name, (attn, lin) in variants.items():
            stages.vision_attention, stages.linear_residual_layer_norm = attn, lin
            us, _ = graph_time_us(lambda i: engine.vision.run(buf, rows.slots), 1, replays=300)
            emb = buf.prefix_embs[: rows.slots * 256].float().clone()
            ref = emb if ref is None else ref
            out.setdefault(name, {"us": [], "max_diff_vs_baseline": float((emb - ref).abs().max())})["us"].append(
                round(us, 1))
            print("stage", name, round(us, 1), flush=True)
    stages.vision_attention, stages.linear_residual_layer_norm = variants["cublas+sdpa"]
    prefix = {}
    for lib in ("default", "cublaslt", "default"):
        torch.backends.cuda.preferred_blas_library("cublaslt" if lib == "cublaslt" else "cublas")
        v_us, _ = graph_time_us(lambda i: engine.vision.run(buf, rows.slots), 1, replays=300)
        p_us, _ = graph_time_us(lambda i: engine.prefix.run(buf, rows, prepared=True), 1, replays=300)
        prefix.setdefault(lib, []).append({"vision_us": round(v_us, 1), "prefix_us": round(p_us, 1)})
        print("blas", lib, v_us, p_us, flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    stages.vision_attention, stages.linear_residual_layer_norm = (rowops.vision_attention,
                                                                  rowops.linear_residual_layer_norm)
    result["stage"] = out
    result["blas_library"] = prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    best = time_linears(result)
    attention = time_attention(result)
    time_stage(result, best, attention)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
