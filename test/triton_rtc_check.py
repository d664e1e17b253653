"""The Triton `rtc` step (`engine/rtc_triton.py`) against autograd through the float32 torch step.

Run as `TRITON_INTERPRET=1 python -m test.triton_rtc_check [--pi0] [--steps N] [--depth L]` on
the CPU, or without the variable on a GPU (`--device cuda`); fp16 kernels either way (the
interpreter has no bf16 dot). Prints the errors and exits non-zero on a mismatch. Checks:
- the hand-written VJP J_δᵀ·c after each step's forward, relative to autograd's (the forward's
  own fp16 rounding is the error floor; the reference is float32);
- the guided chain x[1..steps] against `guidance.RtcStep` on the float32 weights, relative to how
  far the guidance moves x (a wrong backward moves it by that much);
- a second run on the same buffers is bit-identical under the interpreter (atomics in order;
  the accumulators are back at zero) and within float32 atomic-order noise on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from test.denoise_setup import make_step_inputs, medium_config

VJP_TOL = 5e-3  # max |Δ| / max |ref| of J_δᵀ·c (fp16 kernels: ~1e-4 to 1e-3)
CHAIN_TOL = 5e-3  # max |Δx| / max |x_guided − x_plain| (reference)
VALID_PREFIX = 24


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pi0", action="store_true", help="pi0 geometry (51 suffix rows) instead of pi0.5")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.device == "cpu" and not interpret:
        print("on the CPU, set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from pi0_policy_ros.engine.denoise import TorchDenoiseStep
    from pi0_policy_ros.engine.guidance import GuidanceBuffers, RtcStep
    from pi0_policy_ros.engine.rtc_triton import TritonRtcStep
    from pi0_policy_ros.model.rtc import DEFAULT_MAX_GUIDANCE_WEIGHT, soft_mask

    cfg = medium_config(pi05=not args.pi0, depth=args.depth)
    dtype = torch.float16  # the interpreter has no bf16 dot; fp16 keeps one tolerance on the GPU too
    # Few valid prefix keys, so that this step's own keys carry much of the attention and their
    # gradients (dk, dv of the suffix rows) matter to the result.
    low = make_step_inputs(cfg, dtype, args.device, seed=3, valid_prefix=VALID_PREFIX)
    ref = make_step_inputs(cfg, torch.float32, args.device, seed=3, valid_prefix=VALID_PREFIX)  # same, float32
    shape = low.shape
    steps = min(args.steps, shape.num_steps)
    h, a = shape.action_horizon, shape.action_dim
    gen = torch.Generator().manual_seed(5)

    def guide_for(device: str) -> GuidanceBuffers:
        g = GuidanceBuffers.allocate(h, a, torch.device(device))
        g.prev.copy_(torch.randn(h, a, generator=gen))
        g.mask.copy_(soft_mask(h, 2, h - h // 2)[:, None].expand(h, a))
        g.mask[:, 7:] = 0.0
        return g

    guide = guide_for(args.device)
    ok = True

    # 1. The VJP after each step's forward, against autograd through the float32 torch step.
    buf = low.fresh_buffers()
    step = TritonRtcStep.build(low.weights, low.tables, shape, buf, guide, DEFAULT_MAX_GUIDANCE_WEIGHT)
    torch_step = TorchDenoiseStep(ref.weights, ref.tables, shape, torch.float32)
    ref_buf = ref.fresh_buffers()
    for k in range(steps):
        cot = torch.randn(h, a, generator=gen).to(args.device)
        got = torch.zeros(h, a, device=args.device)
        with torch.no_grad():
            step.fwd.run(buf, k)
            step.vjp.run(buf, k, cot, got)
            ref_buf.x[k].copy_(buf.x[k])
        x = ref_buf.x[k].detach().clone().requires_grad_(True)
        (want,) = torch.autograd.grad(torch_step.delta(ref_buf, k, x), x, grad_outputs=cot)
        err = float((got - want).abs().max() / want.abs().max())
        print(f"vjp step {k}: max|ref| {float(want.abs().max()):.3e}  rel err {err:.2e}", flush=True)
        ok &= err <= VJP_TOL and bool(torch.isfinite(got).all())

    # 2. The guided chain against the torch RtcStep (float32) and the plain torch chain.
    def chain(step_obj: object, buffers: object) -> torch.Tensor:
        with torch.no_grad():
            for k in range(steps):
                step_obj.run(buffers, k)
        return buffers.x[1:steps + 1].clone()

    guided = chain(step, low.fresh_buffers())
    again_buf = low.fresh_buffers()
    again = chain(step, again_buf)
    ref_guided = chain(RtcStep(torch_step, guide, ref.tables.times, DEFAULT_MAX_GUIDANCE_WEIGHT), ref.fresh_buffers())
    ref_plain = chain(torch_step, ref.fresh_buffers())
    moved = float((ref_guided - ref_plain).abs().max())
    err = float((guided - ref_guided).abs().max()) / moved
    rerun = float((again - guided).abs().max())
    zeroed = float(step.vjp.dq.abs().max() + step.vjp.dk.abs().max() + step.vjp.dv.abs().max())
    print(f"chain: guidance moves x by {moved:.3e}; |x - torch rtc| / that {err:.2e}; rerun {rerun:.1e}; "
          f"accumulators after {zeroed:.1e}", flush=True)
    ok &= err <= CHAIN_TOL and zeroed == 0.0 and (rerun == 0.0 if interpret else rerun <= 1e-3 * moved)
    print("ok" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
