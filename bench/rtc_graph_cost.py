"""Cost of RTC guidance inside a captured CUDA graph chain, and proof that it captures.

The reference model's denoise step (model/pi0.py, eager torch ops, not the engine's fused step)
is captured as one CUDA graph of all denoise steps, three ways: the plain chain, `rtc_fast`
(error-only guidance) and `rtc` (true VJP through the action expert, autograd captured inside
the graph). The noise, the previous chunk, the soft mask and the per-step guidance weights are
static input buffers. Each graph's replay is checked against the eager `sample_actions_guided` on
two different inputs (the second after capture: no stale buffers), then timed with CUDA events.

Usage (device machine): python3 bench/rtc_graph_cost.py --model pi05 --dtype bfloat16 --output $OUT/x.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi0_policy_ros.model.checkpoint import random_model  # noqa: E402
from pi0_policy_ros.model.config import get_preset  # noqa: E402
from pi0_policy_ros.model.pi0 import ModelInputs, Pi0Model, Prefix, euler_times  # noqa: E402
from pi0_policy_ros.model.rtc import (  # noqa: E402
    compute_prefix,
    guidance_weights,
    guided_velocity,
    sample_actions_guided,
    soft_mask,
)
from pi0_policy_ros.rtc_eval import synthetic_inputs  # noqa: E402

MODES = ("plain", "rtc_fast", "rtc")


class GuidedChainGraph:
    """All denoise steps as one CUDA graph over static buffers (x0, prev, mask, weights)."""

    def __init__(self, model: Pi0Model, prefix: Prefix, state: torch.Tensor, horizon: int, mode: str,
                 beta: float) -> None:
        dev = state.device
        cfg = model.cfg
        self.model, self.prefix, self.state, self.mode = model, prefix, state, mode
        self.times = euler_times(cfg.num_denoise_steps)
        self.t = [torch.full((1,), t, dtype=torch.float32, device=dev) for t in self.times]
        self.dt = torch.tensor(-1.0 / cfg.num_denoise_steps, dtype=torch.float32, device=dev)
        self.weights = torch.tensor(guidance_weights(self.times, beta), dtype=torch.float32, device=dev)
        self.x0 = torch.zeros(1, horizon, cfg.action_dim, device=dev)
        self.prev = torch.zeros_like(self.x0)
        self.mask = torch.zeros(horizon, device=dev)
        self.out = torch.zeros_like(self.x0)
        self.graph = torch.cuda.CUDAGraph()

    def _chain(self) -> None:
        x = self.x0
        for k, t_value in enumerate(self.times):
            velocity = functools.partial(self.model.denoise_step, self.prefix, self.state, t=self.t[k])
            if self.mode == "plain":
                with torch.no_grad():
                    v = velocity(x)
            else:
                v = guided_velocity(velocity, x, t_value, self.weights[k], self.prev, self.mask, self.mode)
            x = x + self.dt * v
        self.out.copy_(x)

    def capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._chain()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            self._chain()

    def replay(self, x0: torch.Tensor, prev: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.x0.copy_(x0)
        self.prev.copy_(prev)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.out


def time_ms(fn, iters: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pi05", choices=("pi05", "pi0", "pi05_small", "pi0_small"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--delay", type=int, default=2)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    dev = "cuda"
    dtype = getattr(torch, args.dtype)
    cfg = get_preset(args.model)
    model = random_model(cfg, dev, dtype, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    src = synthetic_inputs(cfg.max_token_len, cfg.action_dim, cfg.num_image_slots, seed=0)
    inputs = ModelInputs([i.to(dev) for i in src.images], [m.to(dev) for m in src.image_masks], src.tokens.to(dev),
                         src.token_mask.to(dev), src.state.to(dev))
    prefix = compute_prefix(model, inputs)
    h = cfg.action_horizon
    s = h // 2
    gen = torch.Generator(device=dev).manual_seed(1)
    cases = []
    for _ in range(2):
        noise = torch.randn(1, h, cfg.action_dim, device=dev, generator=gen)
        prev = torch.randn(1, h, cfg.action_dim, device=dev, generator=gen)
        cases.append((noise, prev, soft_mask(h, args.delay, h - s).to(dev)))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "dtype": args.dtype, "horizon": h, "delay": args.delay, "execute_horizon": s, "beta": args.beta,
              "modes": {}}
    for mode in MODES:
        chain = GuidedChainGraph(model, prefix, inputs.state, h, mode, args.beta)
        chain.capture()
        errors = []
        for noise, prev, mask in cases:  # the second case runs after capture with new buffers
            got = chain.replay(noise, prev, mask).clone()
            ref = sample_actions_guided(model, inputs, noise, None if mode == "plain" else prev, args.delay, s,
                                        args.beta, "rtc" if mode == "plain" else mode, prefix=prefix, mask=mask)
            errors.append(float((got - ref).abs().max()))
        noise, prev, mask = cases[0]
        graph_ms = time_ms(functools.partial(chain.replay, noise, prev, mask), args.iters)
        eager_ms = time_ms(functools.partial(sample_actions_guided, model, inputs, noise,
                                             None if mode == "plain" else prev, args.delay, s, args.beta,
                                             "rtc" if mode == "plain" else mode, prefix=prefix, mask=mask),
                           max(5, args.iters // 5))
        report["modes"][mode] = {"graph_median_ms": graph_ms[0], "graph_p99_ms": graph_ms[1],
                                 "eager_median_ms": eager_ms[0], "max_abs_error_vs_eager": errors}
        del chain
        torch.cuda.empty_cache()
    plain = report["modes"]["plain"]["graph_median_ms"]
    for mode in MODES:
        report["modes"][mode]["graph_over_plain"] = report["modes"][mode]["graph_median_ms"] / plain
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    text = json.dumps(report, indent=1)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
