"""Prefix attention at the benchmark's compact layout (2 images + a 32-token bucket = 544 rows, 536
valid keys; Gemma 2B: 8 query heads, one KV head, hd 256): the additive key mask of
`scaled_dot_product_attention` against forms that take the valid key count from a device tensor
instead (flash varlen `seqused_k`, or the key sequence's end in `cu_seq_k`), with no mask. Each is
17 calls (one per layer) captured in a CUDA graph; the number is the median replay time per call.
Outputs are compared with a float32 masked reference. Also the GEGLU row kernel's launch shape
on the [544, 2·16384] gate/up rows (one program per row; columns per loop step, warps).

Usage (GPU machine): python3 bench/prefix_compact_micro.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.graph_timing import graph_time_us

ROWS, VALID, HEADS, HD, LAYERS = 544, 536, 8, 256, 17


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    q = torch.randn(ROWS, HEADS, HD, device=dev, dtype=bf16)  # [P, heads, hd] = the engine's [P, heads·hd]
    k = torch.randn(ROWS, 1, HD, device=dev, dtype=bf16)
    v = torch.randn(ROWS, 1, HD, device=dev, dtype=bf16)
    bias = torch.zeros(1, 1, 1, ROWS, device=dev, dtype=bf16)
    bias[..., VALID:] = -2.3819763e38
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
                                         v.float().transpose(0, 1)[None], attn_mask=bias.float(), enable_gqa=True)
    ref = ref[0].transpose(0, 1)  # [P, heads, hd]
    cu_q = torch.tensor([0, ROWS], dtype=torch.int32, device=dev)
    cu_k_valid = torch.tensor([0, VALID], dtype=torch.int32, device=dev)
    used = torch.tensor([VALID], dtype=torch.int32, device=dev)
    qf = q.view(1, 1, ROWS * HEADS, HD)
    # flash varlen with the heads folded into the rows (row p·heads + h of one head: no GQA needed)
    q1, k1, v1 = q.view(ROWS * HEADS, 1, HD), k, v
    cu_q1 = torch.tensor([0, ROWS * HEADS], dtype=torch.int32, device=dev)
    flash = torch.ops.aten._flash_attention_forward
    efficient = torch.ops.aten._efficient_attention_forward
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa_folded_bias": lambda: F.scaled_dot_product_attention(qf, k.view(1, 1, ROWS, HD), v.view(1, 1, ROWS, HD),
                                                                   attn_mask=bias).view(ROWS, HEADS, HD),
        "sdpa_folded_nomask (wrong: attends the padded keys)":
            lambda: F.scaled_dot_product_attention(qf, k.view(1, 1, ROWS, HD), v.view(1, 1, ROWS, HD)).view(ROWS, HEADS, HD),
        "flash_varlen_folded_cu_seq_k": lambda: flash(q1, k1, v1, cu_q1, cu_k_valid, ROWS * HEADS, ROWS, 0.0, False,
                                                      False)[0].view(ROWS, HEADS, HD),
        "flash_varlen_folded_seqused_k": lambda: flash(q1, k1, v1, cu_q1, cu_q, ROWS * HEADS, ROWS, 0.0, False, False,
                                                       seqused_k=used)[0].view(ROWS, HEADS, HD),
        "flash_varlen_heads_cu_seq_k": lambda: flash(q, k.expand(ROWS, HEADS, HD), v.expand(ROWS, HEADS, HD), cu_q,
                                                     cu_k_valid, ROWS, ROWS, 0.0, False, False)[0],
        "efficient_folded_seqlen_k": lambda: efficient(qf.transpose(1, 2), k.view(1, ROWS, 1, HD), v.view(1, ROWS, 1, HD),
                                                       None, None, None, None, None, 0.0, 0,
                                                       seqlen_k=used)[0].view(ROWS, HEADS, HD),
    }
    out: dict[str, dict[str, float]] = {}
    for name, fn in variants.items():
        try:
            us, got = graph_time_us(lambda _: fn(), LAYERS)
            err = float((got.float() - ref).abs().max())
            out[name] = {"us_per_call": us, "max_abs_vs_fp32_masked": err}
            print(f"{name:<52}{us:8.1f} us  max|Δ| {err:.2e}", flush=True)
        except Exception as exc:  # a backend may be missing on this build: report and go on
            out[name] = {"error": repr(exc)[:300]}
            print(f"{name:<52} error {exc!r:.200}", flush=True)
    from pi0_policy_ros.engine import kernels_triton as K
    gu = torch.randn(ROWS, 2 * 16384, device=dev, dtype=bf16)
    act = torch.empty(ROWS, 16384, device=dev, dtype=bf16)
    want = (F.gelu(gu[:, :16384].float(), approximate="tanh") * gu[:, 16384:].float())
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
        def geglu() -> torch.Tensor:
            K.geglu_rows_kernel[(ROWS,)](gu, act, act, 16384, gu.stride(0), act.stride(0), QUANT=False, FP8_MAX=448.0,
                                         BLOCK=block, ONE_PASS=False, num_warps=warps)
            return act
        us, got = graph_time_us(lambda _: geglu(), LAYERS)
        name = f"geglu block {block} warps {warps}"
        out[name] = {"us_per_call": us, "max_abs_vs_fp32": float((got.float() - want).abs().max())}
        print(f"{name:<52}{us:8.1f} us", flush=True)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "valid": VALID}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
