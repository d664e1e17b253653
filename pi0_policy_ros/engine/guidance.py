"""Real-time chunking inside the engine's captured denoise chain (the maths and the eager
reference are in `model/rtc.py`).

Two static input buffers per engine, filled before every replay:
- `prev` [H, A]: Y, the previous chunk's actions from the new observation time on, model space;
- `mask` [H, A]: the soft mask W per row, zero on the dims the robot does not use (their values
  are never executed, so nothing should pull them anywhere).
The per-step times, guidance weights and dt are configure-time constants baked into the graphs.
An all-zero mask (no previous chunk yet) makes both forms equal the plain step.

- `rtc_fast`: the plain step (any kernels) writes x[k+1] = x[k] + dt·v, then one elementwise
  correction: `x[k+1] −= dt·w·W ⊙ (Y − x̂)` with `x̂ = x[k] − t·v`.
- `rtc`: `x[k+1] = x[k] + dt·(v − w·g)`, `g = (W ⊙ (Y − x̂))ᵀ ∂x̂/∂x`, the vector-Jacobian
  product of the error through `x̂ = x − t·v(x)`. Two implementations: `RtcStep` here takes it
  by autograd through the differentiable torch step (`TorchDenoiseStep.delta`, which writes no
  buffer; CUDA graphs capture autograd's kernels like any others; every precision), and
  `rtc_triton.TritonRtcStep` runs the Triton step with a hand-written backward (bf16 on CUDA,
  the engine's default there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.denoise import DenoiseStep, TorchDenoiseStep
from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.model.rtc import guidance_weights, rtc_fast_update_

RTC_ENGINE_MODES = ("off", "rtc_fast", "rtc")


def check_rtc_mode(mode: str) -> str:
    if mode not in RTC_ENGINE_MODES:
        raise ConfigError(f"engine rtc_mode must be one of {RTC_ENGINE_MODES}, found {mode!r}")
    return mode


@dataclass(frozen=True)
class EngineGuidance:
    """One request's guidance, model space: prev Y and mask W, both float32 [H, A]."""

    prev: np.ndarray
    mask: np.ndarray

    def check(self, horizon: int, action_dim: int) -> None:
        for name in ("prev", "mask"):
            value = np.asarray(getattr(self, name))
            if value.shape != (horizon, action_dim):
                raise ObservationError(f"RTC guidance {name}: expected [{horizon}, {action_dim}], found "
                                       f"{list(value.shape)}")
            if not np.all(np.isfinite(value)):
                raise ObservationError(f"RTC guidance {name}: expected finite values, found NaN/Inf")


@dataclass
class GuidanceBuffers:
    """Host (pinned on CUDA) and device copies of Y and W."""

    host_prev: torch.Tensor
    host_mask: torch.Tensor
    prev: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def allocate(cls, horizon: int, action_dim: int, device: torch.device) -> GuidanceBuffers:
        pin = device.type == "cuda"
        size = (horizon, action_dim)
        return cls(torch.zeros(size, pin_memory=pin), torch.zeros(size, pin_memory=pin),
                   torch.zeros(size, device=device), torch.zeros(size, device=device))

    def load(self, guidance: EngineGuidance | None) -> None:
        """No guidance: a zero mask, which makes the guided chain the plain one."""
        if guidance is None:
            self.host_mask.zero_()
            return
        self.host_prev.copy_(torch.from_numpy(np.ascontiguousarray(guidance.prev, dtype=np.float32)))
        self.host_mask.copy_(torch.from_numpy(np.ascontiguousarray(guidance.mask, dtype=np.float32)))

    def upload(self) -> None:
        self.prev.copy_(self.host_prev, non_blocking=True)
        self.mask.copy_(self.host_mask, non_blocking=True)


@dataclass(frozen=True)
class GuidanceSchedule:
    """The per-step constants every guided step bakes into its graphs: the Euler times, the guidance
    weights clipped at β, and openpi's Euler step dt (t runs from 1 to 0)."""

    times: list[float]
    weights: list[float]
    dt: float

    @classmethod
    def build(cls, times: list[float], max_guidance_weight: float) -> GuidanceSchedule:
        return cls(list(times), guidance_weights(times, max_guidance_weight), -1.0 / len(times))


class RtcFastStep:
    """The plain step, then the error-only correction (elementwise)."""

    def __init__(self, plain: DenoiseStep, guide: GuidanceBuffers, times: list[float], max_guidance_weight: float
                 ) -> None:
        self.plain = plain
        self.guide = guide
        self.schedule = GuidanceSchedule.build(times, max_guidance_weight)

    def run(self, buf: DeviceBuffers, step: int) -> None:
        self.plain.run(buf, step)
        g, sc = self.guide, self.schedule
        # [1, H, A] views: a 3-D mask is W per row and dim (model/rtc.py)
        rtc_fast_update_(buf.x[step][None], buf.x[step + 1][None], sc.times[step], sc.dt, sc.weights[step],
                         g.prev[None], g.mask[None])


class RtcStep:
    """The true vector-Jacobian product through the action expert (torch ops + autograd)."""

    def __init__(self, torch_step: TorchDenoiseStep, guide: GuidanceBuffers, times: list[float],
                 max_guidance_weight: float) -> None:
        self.torch_step = torch_step
        self.guide = guide
        self.schedule = GuidanceSchedule.build(times, max_guidance_weight)

    def run(self, buf: DeviceBuffers, step: int) -> None:
        x_in = buf.x[step]
        t, dt, g = self.schedule.times[step], self.schedule.dt, self.guide
        with torch.enable_grad():
            x = x_in.detach().requires_grad_(True)
            delta = self.torch_step.delta(buf, step, x)  # dt·v
            x_hat = x - (t / dt) * delta
            error = (g.mask * (g.prev - x_hat)).detach()
            (vjp,) = torch.autograd.grad(x_hat, x, grad_outputs=error)
        torch.add(x_in + delta.detach(), vjp, alpha=-dt * self.schedule.weights[step], out=buf.x[step + 1])
