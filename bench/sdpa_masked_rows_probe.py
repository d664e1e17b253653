"""What torch's SDPA gives a query row whose every key is masked by an additive mask, per backend,
dtype and mask value, against the explicit float64 softmax (uniform weights: openpi's result).

Run 161's GPU selftest found `prefix_last_hidden` 3.9 off openpi's reference on the H100 (1.2e-5 before
`gemma.attention` used SDPA), with the actions still at 7e-7: only the padded prefix rows differ.

    python3 bench/sdpa_masked_rows_probe.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

OPENPI_MASK_VALUE = -2.3819763e38
BACKENDS = {"default": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def run(dtype: torch.dtype, backend: str, mask_value: float, head_dim: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    heads, rows, valid = 8, 40, 30
    q, k, v = (torch.randn(1, heads, rows, head_dim, generator=gen) for _ in range(3))
    pad = torch.arange(rows) < valid
    allowed = (pad[:, None] & pad[None, :])[None, None]
    mask = torch.where(allowed, torch.zeros(()), torch.full((), mask_value))
    probs = torch.softmax(q.double() @ k.double().transpose(2, 3) * head_dim**-0.5 + mask.double(), dim=-1)
    want = probs @ v.double()
    args = [t.to(device, dtype) for t in (q, k, v)] + [mask.to(device, dtype)]
    try:
        if BACKENDS[backend] is None:
            got = F.scaled_dot_product_attention(*args[:3], attn_mask=args[3])
        else:
            with sdpa_kernel(BACKENDS[backend]):
                got = F.scaled_dot_product_attention(*args[:3], attn_mask=args[3])
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[0][:160]}
    got = got.double().cpu()
    padded = got[:, :, valid:]
    return {"valid_rows_max_abs": float((got[:, :, :valid] - want[:, :, :valid]).abs().max()),
            "padded_rows_max_abs": float((padded - want[:, :, valid:]).abs().nan_to_num(float("inf")).max()),
            "padded_rows_all_zero": bool((padded == 0).all()), "padded_rows_nan": bool(padded.isnan().any())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for backend in BACKENDS:
            for mask_value in (OPENPI_MASK_VALUE, -1e30):
                for head_dim in (16, 256):
                    r = run(dtype, backend, mask_value, head_dim, args.device)
                    r.update(dtype=str(dtype).split(".")[-1], backend=backend, mask_value=mask_value, head_dim=head_dim)
                    results.append(r)
                    print(json.dumps(r))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    with open(args.json, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
