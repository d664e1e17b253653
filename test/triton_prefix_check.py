"""The vision and prefix stages' Triton kernels (`engine/rowops.py`) against their torch forms.

Run as `TRITON_INTERPRET=1 python -m test.triton_prefix_check` on the CPU, or with `--device cuda`
on a GPU. Checks RoPE into q and the K/V cache rows (with and without q heads, a row count that
is not a multiple of the row block), residual + bias + LayerNorm, SigLIP's attention from the fused
qkv rows (token and head sizes that are not powers of two), GEGLU, and GEGLU + per-row e4m3
quantization in its one-pass and two-pass forms (equal to each other, the row scales right, and on
a GPU the values equal to the torch GEGLU within e4m3 rounding), and the FP8 down projection with
the residual in its epilogue.
Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from test.check_report import CheckReport


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("on the CPU, set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from pi0_policy_ros.engine import rowops
    from pi0_policy_ros.engine.tables import rope_tables
    from pi0_policy_ros.engine.weights import FP8_MAX, Linear, quantize_rows as quantize_rows_torch, to_fp8

    dev, dtype = torch.device(args.device), torch.float16
    gen = torch.Generator().manual_seed(0)
    report = CheckReport(34)

    rows, hd = 37, 64
    positions = torch.randint(0, 900, (rows,), generator=gen).to(dev)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)).to(dev)
    cos, sin = rope_tables(positions, inv_freq, dtype)
    for heads in (8, 0):
        qkv = torch.randn(rows, (heads + 2) * hd, generator=gen).to(dev, dtype)
        k_got, v_got = torch.zeros(rows, hd, dtype=dtype, device=dev), torch.zeros(rows, hd, dtype=dtype, device=dev)
        # the torch form on float32 copies: the kernel rotates in float32 and rounds once
        k32, v32 = torch.zeros(rows, hd), torch.zeros(rows, hd)
        q32 = rowops.rope_qkv(qkv.float().cpu(), cos.float().cpu(), sin.float().cpu(), heads, k32, v32)
        q_got = rowops.rope_qkv_triton(qkv, cos, sin, heads, k_got, v_got)
        report(f"rope_qkv heads={heads}: k", float((k_got.float().cpu() - k32).abs().max()), 4e-3)
        report(f"rope_qkv heads={heads}: v", float((v_got.float().cpu() - v32).abs().max()), 0.0)
        if heads:
            report(f"rope_qkv heads={heads}: q", float((q_got.float().cpu() - q32).abs().max()), 4e-3)
        else:
            report.ok &= q_got is None and q32 is None

    gu = torch.randn(5, 2 * 3000, generator=gen).to(dev, dtype)  # a row that is not a power of two
    want = torch.nn.functional.gelu(gu[:, :3000].float(), approximate="tanh") * gu[:, 3000:].float()
    report("geglu", float((rowops.geglu_triton(gu).float() - want).abs().max()), 4e-3)
    q1, s1 = rowops.geglu_quantized_triton(gu, one_pass=True)
    q2, s2 = rowops.geglu_quantized_triton(gu, one_pass=False)
    report("geglu+e4m3 one pass vs two", float((q1.float() * s1 - q2.float() * s2).abs().max()), 0.0)
    amax = want.abs().amax(dim=1, keepdim=True)
    report("geglu+e4m3 row scale", float((s1 * FP8_MAX / amax - 1).abs().max()), 4e-3)

    # residual + bias + LayerNorm (vision): a width that is not a power of two, rows offset by 3
    x = (torch.randn(37, 1152, generator=gen) * 4 + 3).to(dev, dtype)
    y, bias = torch.randn(37, 1152, generator=gen).to(dev, dtype), torch.randn(1152, generator=gen).to(dev, dtype)
    x_want = (x.float() + y.float() + bias.float()).to(dtype).float()
    h_want = torch.nn.functional.layer_norm(x_want, (1152,), eps=1e-6)
    h = rowops.residual_layer_norm_triton(x, y, bias, 1e-6)
    report("residual+layernorm: x", float((x.float() - x_want).abs().max() / x_want.abs().max()), 1e-3)
    report("residual+layernorm: h", float((h.float() - h_want).abs().max()), 4e-3)
    # vision attention from the fused qkv rows: 2 images of 50 tokens, 3 heads of 24 (neither a
    # power of two), against SDPA in float32 on the same values
    images, t, heads, hd = 2, 50, 3, 24
    qkv = torch.randn(images * t, 3 * heads * hd, generator=gen).to(dev, dtype)
    q, k, v = qkv.float().cpu().view(images, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
    attn_want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(images * t, -1)
    got = rowops.vision_attention_triton(qkv, images, heads, block_q=32)
    report("vision attention", float((got.float().cpu() - attn_want).abs().max()), 4e-3)
    if dev.type == "cuda":
        # Triton 3.6's interpreter rounds some values to e4m3 wrongly (126.2 → 64: the mantissa
        # carry is lost), so the quantized values are compared on the GPU only. e4m3 keeps 3
        # mantissa bits: half an ulp is 1/16 of the value; subnormals are 2^-9 of the scale apart.
        deq = q1.float() * s1
        report("geglu+e4m3 vs torch geglu", float(((deq - want).abs() / (want.abs() + s1)).max()), 7e-2)
    # FP8 down projection + residual (TMA descriptors): rows and columns past a tile's end (37 rows
    # in 64-row tiles, 192 columns in 128-column tiles), against float32 math rounded once to x
    w = torch.randn(192, 256, generator=gen) / 16
    lin = to_fp8(Linear(w))
    lin = Linear(lin.weight.to(dev), None, lin.scale.to(dev))
    xq, sx = quantize_rows_torch(torch.randn(37, 256, generator=gen))
    xq, sx = xq.to(dev), sx.to(dev)
    x0 = (torch.randn(37, 192, generator=gen) * 4).to(dev, dtype)
    y = (xq.float() * sx) @ (lin.weight.float() * lin.scale.t()).t()
    want = (x0.float() + y).to(dtype).float()
    x = x0.clone()
    rowops.fp8_linear_residual_triton(x, xq, sx, lin)
    # beyond one rounding step of x, relative to the products: the GPU's e4m3 tensor cores sum with
    # fewer bits than float32 (~1e-4 of the largest output at K = 16384, notes attempt 29)
    excess = ((x.float() - want).abs() - _ulp(want, dtype)).clamp(min=0)
    report("fp8 linear + residual", float(excess.max() / y.abs().max()), 1e-3)
    print("ok" if report.ok else "FAIL")
    return 0 if report.ok else 1


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values at each |x| (its smallest normal's below it)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=info.tiny)))) * info.eps


if __name__ == "__main__":
    sys.exit(main())
