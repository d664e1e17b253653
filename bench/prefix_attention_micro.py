"""The prefix's attention at the bench's compact layout (544 rows, 536 valid keys, 8 query heads
over one KV head of 256), every backend torch offers, for the notes (attempt 32).

Each variant is checked against float32 attention with the key mask (rows of the valid keys
only), then timed as a CUDA graph of 17 calls (one per layer but the KV-only last), median of 30 replays,
in µs a call (`graph_timing.graph_time_us`; run 84 used 18 calls and 20 replays).

Usage (GPU machine): PYTHONPATH=. python3 bench/prefix_attention_micro.py [--rows 544] [--valid 536] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.graph_timing import graph_time_us

HEADS, HD = 8, 256
LAYERS = 17  # attention calls a prefix makes (the last layer only writes K/V)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=544)
    parser.add_argument("--valid", type=int, default=536, help="valid keys (the first ones)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows, valid, dev = args.rows, args.valid, torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(rows, HEADS, HD, device=dev, dtype=torch.bfloat16)
    k = torch.randn(rows, HD, device=dev, dtype=torch.bfloat16)
    v = torch.randn(rows, HD, device=dev, dtype=torch.bfloat16)
    bias = torch.zeros(1, 1, 1, rows, device=dev, dtype=torch.bfloat16)
    bias[..., valid:] = torch.finfo(torch.bfloat16).min
    # reference: float32, the valid keys only
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k[:valid].float()[None, None],
                                         v[:valid].float()[None, None])[0].transpose(0, 1)
    folded = q.view(rows * HEADS, 1, HD)  # the engine's form: heads as rows of the one KV head
    cu_folded = torch.tensor([[0, rows * HEADS], [0, valid]], device=dev, dtype=torch.int32)
    cu_heads = torch.tensor([[0, rows], [0, valid]], device=dev, dtype=torch.int32)
    q_heads = q.transpose(0, 1)[None]  # [1, H, P, hd]
    k_exp, v_exp = k[None, None].expand(1, HEADS, rows, HD), v[None, None].expand(1, HEADS, rows, HD)
    k_con, v_con = k_exp.contiguous(), v_exp.contiguous()

    def flash(qv: torch.Tensor, cu: torch.Tensor, max_q: int) -> Callable[[], torch.Tensor]:
        return lambda: torch.ops.aten._flash_attention_forward(qv, k[:, None], v[:, None], cu[0], cu[1], max_q, rows,
                                                               0.0, False, False)[0]

    def sdpa(backend: SDPBackend, qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor,
             mask: torch.Tensor | None, **kw: object) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, **kw)
        return run

    as_rows = {  # output → [P, H, hd]
        "flash_varlen_folded": (flash(folded, cu_folded, rows * HEADS), lambda o: o.view(rows, HEADS, HD)),
        "flash_varlen_heads": (flash(q, cu_heads, rows), lambda o: o),
        "cudnn_heads_bias_expand": (sdpa(SDPBackend.CUDNN_ATTENTION, q_heads, k_exp, v_exp, bias),
                                    lambda o: o[0].transpose(0, 1)),
        "cudnn_heads_bias_contig": (sdpa(SDPBackend.CUDNN_ATTENTION, q_heads, k_con, v_con, bias),
                                    lambda o: o[0].transpose(0, 1)),
        "cudnn_heads_gqa_bias": (sdpa(SDPBackend.CUDNN_ATTENTION, q_heads, k[None, None], v[None, None], bias,
                                      enable_gqa=True), lambda o: o[0].transpose(0, 1)),
        "cudnn_folded_bias": (sdpa(SDPBackend.CUDNN_ATTENTION, folded.view(1, 1, rows * HEADS, HD), k[None, None],
                                   v[None, None], bias), lambda o: o.view(rows, HEADS, HD)),
        "efficient_folded_bias": (sdpa(SDPBackend.EFFICIENT_ATTENTION, folded.view(1, 1, rows * HEADS, HD),
                                       k[None, None], v[None, None], bias), lambda o: o.view(rows, HEADS, HD)),
        "cudnn_heads_nomask_timing_only": (sdpa(SDPBackend.CUDNN_ATTENTION, q_heads, k_con, v_con, None),
                                           lambda o: o[0].transpose(0, 1)),
    }
    results: dict[str, dict[str, object]] = {}
    for name, (fn, to_rows) in as_rows.items():
        try:
            out = to_rows(fn()).float()
            err = float((out - ref).abs().max()) if "timing_only" not in name else None
            results[name] = {"us": graph_time_us(lambda _: fn(), LAYERS)[0], "max_abs_err": err}
        except (RuntimeError, NotImplementedError) as exc:  # a backend this build or shape lacks: recorded
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "rows": rows, "valid_keys": valid}
    print(json.dumps(meta))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<32} {r['error']}")
        else:
            err = "n/a" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
            print(f"{name:<32} {r['us']:8.2f} us  max|err| {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
