"""Every `denoise_triton.CANDIDATES` config under Triton's interpreter, on CPU fp16 tensors (the
interpreter has no bf16 dot), against the torch step and against the default Triton config.

Run as `TRITON_INTERPRET=1 python -m test.triton_interpreter_check [--pi0] [--steps N] [--depth L]`
(the variable must be set before Triton decorates the kernels, hence a process of its own; see
test/unit/test_denoise_triton_interpreter.py). Prints one line per config and exits non-zero on a
mismatch. Checks: the chain's x[k] for every step, the suffix K/V rows the step wrote, a second
run of the chain on the same buffers (the last-arriver counters must be back at zero, and the
result bit-identical: the interpreter runs programs in order, so its atomics are deterministic).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from test.denoise_setup import StepInputs, make_step_inputs, medium_config

# Max |Δ| of x after the chain, the torch fp16 step (fp16 residual stream) vs the Triton one
# (float32 residual): a few fp16 roundings of the residual per layer.
TORCH_TOL = 5e-2
# New config vs the default Triton config: the same fp16 products, only float32 summation order
# (split-K partials, tree-reduced combine) differs; for the fp16 K/V rows, relative to their max.
CONFIG_TOL = 2e-3


def run_chain(step: object, inputs: StepInputs, buf: object, steps: int) -> None:
    with torch.no_grad():
        for k in range(steps):
            step.run(buf, k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pi0", action="store_true", help="pi0 geometry (51 suffix rows) instead of pi0.5")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--configs", default="", help="comma-separated CANDIDATES names (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from pi0_policy_ros.engine import kernels_triton
    from pi0_policy_ros.engine.denoise import TorchDenoiseStep
    from pi0_policy_ros.engine.denoise_triton import CANDIDATES, TritonDenoiseStep

    assert not kernels_triton.FENCE, "kernels were decorated outside the interpreter"
    cfg = medium_config(pi05=not args.pi0, depth=args.depth)
    dtype = torch.float16
    inputs = make_step_inputs(cfg, dtype, "cpu", seed=3)
    steps = min(args.steps, inputs.shape.num_steps)
    pp = inputs.shape.padded_prefix_len

    ref_buf = inputs.fresh_buffers()
    run_chain(TorchDenoiseStep(inputs.weights, inputs.tables, inputs.shape, dtype), inputs, ref_buf, steps)
    names = [n for n in args.configs.split(",") if n] or list(CANDIDATES)
    failures = []
    base = None
    for name in names:
        t0 = time.perf_counter()
        buf = inputs.fresh_buffers()
        step = TritonDenoiseStep(inputs.weights, inputs.tables, inputs.shape, buf, CANDIDATES[name])
        run_chain(step, inputs, buf, steps)
        first = buf.x[1:steps + 1].clone()
        kv = (buf.keys[:, pp:].float().clone(), buf.values[:, pp:].float().clone())
        counters_after = int(step.counters.abs().sum())
        run_chain(step, inputs, buf, steps)
        again = float((buf.x[1:steps + 1] - first).abs().max())
        if base is None:
            base = (first, kv)
        d_torch = float((first - ref_buf.x[1:steps + 1]).abs().max())
        d_base = float((first - base[0]).abs().max())
        # K/V are stored in fp16: relative to their largest value (an ulp flip is ~1e-3 of it)
        d_kv = max(float((kv[i] - base[1][i]).abs().max() / base[1][i].abs().max()) for i in range(2))
        ok = (d_torch <= TORCH_TOL and d_base <= CONFIG_TOL and d_kv <= CONFIG_TOL and again == 0.0
              and counters_after == 0 and bool(torch.isfinite(first).all()))
        print(f"{name:16s} |x-torch| {d_torch:.2e}  |x-default| {d_base:.2e}  |kv-default|/max {d_kv:.2e}  "
              f"rerun {again:.1e}  counters {counters_after}  {'ok' if ok else 'FAIL'}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if not ok:
            failures.append(name)
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
