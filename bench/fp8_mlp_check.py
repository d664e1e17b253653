"""The probe kernels of `bench/fp8_mlp_kernels.py` against their torch references (runs 69 and 72).

Run as `TRITON_INTERPRET=1 PYTHONPATH=. python bench/fp8_mlp_check.py` on the CPU (small shapes),
or with `--device cuda [--full]` on a GPU (`--full`: Gemma-2B's width 2048 and mlp 16384 at 544
rows, and each kernel's time). The tolerances are the CPU's: at full size on the GPU the e4m3
tensor cores' own accumulation (about 14 mantissa bits, fast accumulation in gate_up over K = 2048)
exceeds the per-kernel ones (runs 69 and 72; the whole-MLP error is the comparison that counts
there). Checks:
- the norm kernel: RMSNorm, the fold of the workspace into the residual and its clearing, and
  per-row e4m3 output with its scale;
- gate_up + GEGLU + per-group e4m3: the group scales, and every value within one e4m3 rounding of
  the reference's (the kernel sums in another order, so a value near a rounding boundary may
  round the other way);
- down over exact e4m3 inputs: float32 summation order only;
- the whole MLP (norm → gate_up → down → fold) against float32 math on the dequantized weights.
A row count that is not a multiple of the row block, and a workspace with more rows than used.
Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from test.check_report import CheckReport


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="full Gemma-2B width (GPU)")
    args = parser.parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.device == "cpu" and not interpreted:
        print("on the CPU, set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from bench import fp8_mlp_kernels as K
    from bench.fp8_mlp_kernels import GROUP, Fp8Mlp, Fp8MlpConfig, down_reference, gate_up_geglu_reference
    from pi0_policy_ros.engine.weights import FP8_MAX, Linear, quantize_rows, to_fp8

    assert GROUP == K.GROUP
    dev = torch.device(args.device)
    # the interpreter's bf16 conversion truncates (GPU: round to nearest), so the CPU run uses fp16
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    if args.full:
        rows, width, mlp, config = 544, 2048, 16384, Fp8MlpConfig()
    else:
        rows, width, mlp = 37, 256, 512
        config = Fp8MlpConfig(gate_up_block_m=32, gate_up_warps=4, down_block_m=32, down_block_n=64, down_splits=2,
                              down_warps=4)
    gen = torch.Generator().manual_seed(0)
    report = CheckReport(40)

    gate_up = to_fp8(Linear(torch.randn(2 * mlp, width, generator=gen) / width**0.5))
    down = to_fp8(Linear(torch.randn(width, mlp, generator=gen) / mlp**0.5))
    gate_up = Linear(gate_up.weight.to(dev), None, gate_up.scale.to(dev))
    down = Linear(down.weight.to(dev), None, down.scale.to(dev))
    x0 = (torch.randn(rows, width, generator=gen) * 4).to(dev, dtype)
    fp = Fp8Mlp(rows + 3, width, mlp, dev, config)

    # norm: plain, then folding a workspace in (x updated once, rounded once; acc cleared)
    want_h = F.rms_norm(x0.float(), (width,), eps=1e-6)
    report("norm", float((fp.norm(x0.clone(), 1e-6, fold=False).float() - want_h).abs().max()), 1e-2)
    fp.acc.normal_(generator=None)
    acc = fp.acc.clone()
    x = x0.clone()
    h = fp.norm(x, 1e-6, fold=True)
    x_want = (x0.float() + acc[:rows]).to(dtype)
    report("norm fold: x", float((x.float() - x_want.float()).abs().max()), 0.0)
    report("norm fold: h", float((h.float() - F.rms_norm(x_want.float(), (width,), eps=1e-6)).abs().max()), 1e-2)
    report("norm fold: workspace cleared", float(fp.acc[:rows].abs().max()), 0.0)
    report("norm fold: rows past P untouched", float((fp.acc[rows:] - acc[rows:]).abs().max()), 0.0)
    fp.acc.zero_()
    hq = torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=dev)
    hs = torch.empty(rows, 1, dtype=torch.float32, device=dev)
    fp._norm(x0, hq, hs, 1e-6, fold=False, clear=False, quant=True)
    want_q, want_s = quantize_rows(want_h)
    report("norm e4m3: row scales (relative)", float((hs / want_s - 1).abs().max()), 1e-5)
    # the kernel's h = x / rms and torch's x · rsqrt(mean) differ in the last bit: 1 ulp of e4m3 at most
    report("norm e4m3: values (e4m3 ulps)", _e4m3_err(hq, want_q, interpreted), 1.0)

    # gate_up + GEGLU + group quantization, from the reference's e4m3 input
    act = torch.empty(rows, mlp, dtype=torch.float8_e4m3fn, device=dev)
    act_scale = torch.empty(rows, mlp // GROUP, dtype=torch.float32, device=dev)
    num_m = -(-rows // config.gate_up_block_m)

    def run_gate_up() -> None:
        K.gate_up_geglu_kernel[(num_m * (mlp // GROUP),)](
            want_q, want_s, gate_up.weight, gate_up.scale, act, act_scale, rows, width, mlp, width, width, mlp,
            mlp // GROUP, FP8_MAX=FP8_MAX, BLOCK_M=config.gate_up_block_m, GROUP_N=GROUP, BLOCK_K=128,
            num_warps=config.gate_up_warps, num_stages=config.gate_up_stages)

    run_gate_up()
    ref_act, ref_scale = gate_up_geglu_reference(want_q, want_s, gate_up)
    report("gate_up+geglu: group scales (relative)", float((act_scale / ref_scale - 1).abs().max()), 1e-4)
    report("gate_up+geglu: values (e4m3 ulps)", _e4m3_err(act, ref_act, interpreted), 1.0)

    # down over exact inputs (the reference's), into a zeroed workspace
    fp.acc.zero_()
    n_blocks = width // config.down_block_n
    num_m = -(-rows // config.down_block_m)

    def run_down() -> None:
        K.down_splitk_kernel[(num_m * n_blocks, config.down_splits)](
            ref_act, ref_scale, down.weight, down.scale, fp.acc, rows, width, mlp, mlp, mlp // GROUP, mlp,
            fp.acc.stride(0), BLOCK_M=config.down_block_m, BLOCK_N=config.down_block_n, GROUP_K=GROUP,
            SPLITS=config.down_splits, num_warps=config.down_warps, num_stages=config.down_stages)

    run_down()
    want_down = down_reference(ref_act, ref_scale, down)
    report("down: relative to its largest output", float((fp.acc[:rows] - want_down).abs().max()
                                                         / want_down.abs().max()), 1e-5)
    report("down: workspace rows past P untouched", float(fp.acc[rows:].abs().max()), 0.0)

    # the whole MLP, against float32 math on the dequantized weights (no activation quantization)
    fp.acc.zero_()
    x = x0.clone()
    fp(x, gate_up, down, 1e-6)
    acc = fp.acc[:rows].clone()
    fp.norm(x, 1e-6, fold=True)
    y = want_h @ (gate_up.weight.float() * gate_up.scale.t()).t()
    update = (F.gelu(y[:, :mlp], approximate="tanh") * y[:, mlp:]) @ (down.weight.float() * down.scale.t()).t()
    print("acc vs update", float((acc - update).abs().max() / update.abs().max()),
          "x-x0 vs acc", float(((x.float() - x0.float()) - acc).abs().max()), float(update.abs().max()),
          "x0 max", float(x0.abs().max()), "x max", float(x.abs().max()))
    hq2 = torch.empty_like(hq); hs2 = torch.empty_like(hs)
    fp._norm(x0, hq2, hs2, 1e-6, fold=False, clear=False, quant=True)
    ra, rs = gate_up_geglu_reference(hq2, hs2, gate_up)
    print("reference chain vs update", float((down_reference(ra, rs, down) - update).abs().max() / update.abs().max()))
    err = float(((x.float() - x0.float()) - update).abs().max() / update.abs().max())
    # e4m3 activations (3 mantissa bits) in both GEMMs; the interpreter also halves some values
    report("mlp: update vs float32 (relative)", err, 0.25 if interpreted else 0.08)

    if dev.type == "cuda" and args.full:
        for name, fn in (("gate_up+geglu", run_gate_up), ("down", run_down),
                         ("mlp", lambda: fp(x, gate_up, down, 1e-6))):
            print(f"{name:<40} {_time_ms(fn) * 1e3:.1f} µs")
    print("ok" if report.ok else "FAIL")
    return 0 if report.ok else 1


def _e4m3_err(got: torch.Tensor, want: torch.Tensor, interpreted: bool) -> float:
    """Largest difference between e4m3 tensors, in units of want's e4m3 spacing at each value.
    Under Triton 3.6's interpreter a rounding that carries into the next power of two loses the
    carry (126.2 → 64 instead of 128): there, half of a power of two counts as equal to it."""
    g, w = got.float(), want.float()
    spacing = torch.exp2(torch.floor(torch.log2(w.abs().clamp(min=2.0**-6))) - 3)
    err = (g - w).abs() / spacing
    if interpreted:
        power_of_two = torch.exp2(torch.round(torch.log2(w.abs().clamp(min=2.0**-9)))) == w.abs()
        err = torch.where((g * 2 == w) & power_of_two, torch.zeros_like(err), err)
    return float(err.max())


def _time_ms(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 50 * 1e3


if __name__ == "__main__":
    sys.exit(main())
