"""Real-time chunking (RTC): guided denoising toward the part of the previous chunk still being
executed (Black, Galliker, Levine 2025; `shared/spec/openpi_pipeline.md` §7).

Conventions are openpi's: x at t = 1 is noise, t = 0 data, `x_{t+dt} = x_t + dt·v` with dt < 0,
and the predicted clean chunk is `x̂ = x_t − t·v`. The paper's τ is 1 − t, so its guided velocity
`v_τ + w·g` becomes `v − w·g` here, with `g = eᵀ ∂x̂/∂x_t` and `e = W ⊙ (Y − x̂)`.

Y ("prev") is the previous chunk shifted so that row 0 is the new chunk's action 0 (the new
observation's time); rows past its end are ignored through the mask W.

Two guidance forms:
- `rtc`: the true vector-Jacobian product through the action expert (the paper, the authors'
  `realtime_action`). `∂x̂/∂x_t = I − t·∂v/∂x_t`, so it costs a backward pass of the expert.
- `rtc_fast`: `g = e`, i.e. `∂x̂/∂x_t` taken as the identity (what LeRobot's `policies/rtc` amounts to,
  since its v carries no gradient). No backward pass; an elementwise update after each step.

Everything in `guided_velocity` / `rtc_fast_update_` is graph-capturable: no host sync, no Python
branch on a tensor; `prev`, `mask` and the per-step weights can be static device buffers that the
engine fills before replay. `soft_mask` and `guidance_weights` run on the host (at request and
configure time respectively).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.model.pi0 import ModelInputs, Pi0Model, Prefix, euler_times

RTC_MODES = ("rtc", "rtc_fast")
MASK_SCHEDULES = ("exp", "linear")
DEFAULT_MAX_GUIDANCE_WEIGHT = 5.0  # β of the paper and the authors' code (LeRobot defaults to 10)

VelocityFn = Callable[[torch.Tensor], torch.Tensor]  # x_t [B, H, A] → v [B, H, A]


def check_mode(mode: str) -> None:
    if mode not in RTC_MODES:
        raise ConfigError(f"RTC mode must be one of {RTC_MODES}, found {mode!r}")


def soft_mask(horizon: int, delay_steps: int, mask_end: int, schedule: str = "exp") -> torch.Tensor:
    """The soft mask W [H] (float32, CPU).

    W_i = 1 for i < d (actions certainly executed from the previous chunk while we infer),
    decays over d <= i < mask_end, and is 0 for i >= mask_end (past the previous chunk's end;
    the paper's `H − s`). With c_i = (mask_end − i) / (mask_end − d + 1), the decay is
    `c·(e^c − 1)/(e − 1)` for "exp" and `c` for "linear". As in the authors' code, d is capped
    at mask_end, so mask_end = 0 gives all zeros (no guidance).
    """
    if schedule not in MASK_SCHEDULES:
        raise ConfigError(f"mask schedule must be one of {MASK_SCHEDULES}, found {schedule!r}")
    if horizon < 1 or delay_steps < 0 or not 0 <= mask_end <= horizon:
        raise ConfigError(f"expected horizon >= 1, delay_steps >= 0 and 0 <= mask_end <= horizon, found "
                          f"horizon={horizon}, delay_steps={delay_steps}, mask_end={mask_end}")
    d = min(delay_steps, mask_end)
    i = torch.arange(horizon, dtype=torch.float64)
    c = ((mask_end - i) / (mask_end - d + 1)).clamp(0.0, 1.0)
    if schedule == "exp":
        c = c * torch.expm1(c) / (math.e - 1.0)
    c = torch.where(i < d, torch.ones_like(c), c)
    return torch.where(i >= mask_end, torch.zeros_like(c), c).to(torch.float32)


def guidance_weight(t: float, max_guidance_weight: float) -> float:
    """min(β, (1 − τ) / (τ·r_τ²)) with τ = 1 − t and r_τ² = (1 − τ)² / (τ² + (1 − τ)²), which
    simplifies to (τ² + (1 − τ)²) / (τ(1 − τ)); it is +inf at τ = 0 (pure noise), hence β."""
    if not (math.isfinite(max_guidance_weight) and max_guidance_weight >= 0.0):
        raise ConfigError(f"max_guidance_weight must be finite and >= 0, found {max_guidance_weight!r}")
    tau = 1.0 - t
    if tau <= 0.0 or tau >= 1.0:
        return max_guidance_weight
    return min(max_guidance_weight, (tau * tau + (1.0 - tau) ** 2) / (tau * (1.0 - tau)))


def guidance_weights(times: Sequence[float], max_guidance_weight: float) -> list[float]:
    """One weight per denoise step, for the fixed Euler times (`euler_times`): a configure-time
    table, so the captured chain reads weights[step] and never computes it."""
    return [guidance_weight(t, max_guidance_weight) for t in times]


def guided_velocity(velocity_fn: VelocityFn, x_t: torch.Tensor, t: float, weight: float | torch.Tensor,
                    prev: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The guided velocity `v − w·g` at x_t [B, H, A] and time t (a Python float: the steps' times
    are constants of the chain).

    prev: Y [B or 1, H, A] (rows where mask is 0 may hold anything finite).
    mask: W [H] or [B, H] (per row), or [B or 1, H, A] (per row and action dim: the engine zeroes
    the dims the robot does not use). weight: w for this step, a float or a 0-d / [B] device tensor.
    `rtc` differentiates `velocity_fn` once more (autograd with static shapes, capturable the
    way `torch.cuda.make_graphed_callables` captures backward); `rtc_fast` does not.
    """
    check_mode(mode)
    w_mask = _mask_weights(mask)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        weight = weight[:, None, None]
    if mode == "rtc_fast":
        with torch.no_grad():
            v = velocity_fn(x_t)
            return v - weight * (w_mask * (prev - (x_t - t * v)))
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        v = velocity_fn(x)
        x_hat = x - t * v
        error = (w_mask * (prev - x_hat)).detach()
        (g,) = torch.autograd.grad(x_hat, x, grad_outputs=error)
    return v.detach() - weight * g


def rtc_fast_update_(x_in: torch.Tensor, x_out: torch.Tensor, t: float, dt: float, weight: float | torch.Tensor,
                     prev: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`rtc_fast` as an in-place correction of a plain Euler step that already wrote
    `x_out = x_in + dt·v` (the engine's chain folds dt into the output head, so v is implicit):
    `x_out ← x_out − dt·w·W ⊙ (Y − x̂)` with `x̂ = x_in − t·(x_out − x_in)/dt`. Elementwise only."""
    w_mask = _mask_weights(mask)
    x_hat = x_in - (t / dt) * (x_out - x_in)
    return x_out.sub_(dt * weight * w_mask * (prev - x_hat))


def _mask_weights(mask: torch.Tensor) -> torch.Tensor:
    """W as a multiplier of [B, H, A]: [H] → [1, H, 1], [B, H] → [B, H, 1], 3-D as given."""
    if mask.ndim == 3:
        return mask
    return mask[..., :, None] if mask.ndim == 2 else mask[None, :, None]


@torch.no_grad()
def compute_prefix(model: Pi0Model, inputs: ModelInputs, image_embs: list[torch.Tensor] | None = None) -> Prefix:
    embs, pad, _ = model.embed_prefix(inputs, image_embs)
    return model.forward_prefix(embs, pad)


def sample_actions_guided(model: Pi0Model, inputs: ModelInputs, noise: torch.Tensor, prev_chunk: torch.Tensor | None,
                          delay_steps: int, execute_horizon: int,
                          max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT, mode: str = "rtc",
                          schedule: str = "exp", prefix: Prefix | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager reference of the guided chain: `sample_actions` with each velocity replaced by
    `guided_velocity`, over one prefix (computed here unless given).

    prev_chunk: Y [B or 1, H, A], the previous chunk shifted so that row 0 is this chunk's
        action 0; None gives the plain chain (no previous chunk yet).
    delay_steps: d, the predicted inference delay in action steps (frozen prefix).
    execute_horizon: s, actions of the previous chunk consumed since its start, so its remaining
        rows end at `H − s` (the mask's end). `mask` ([H], [B, H] or [B or 1, H, A]), if given,
        replaces `soft_mask(...)` (then delay_steps and execute_horizon are not used).
    """
    check_mode(mode)
    cfg = model.cfg
    if prefix is None:
        prefix = compute_prefix(model, inputs)
    if prev_chunk is None:
        return _sample_plain(model, prefix, inputs.state, noise)
    b, horizon = noise.shape[0], noise.shape[1]
    times = euler_times(cfg.num_denoise_steps)
    weights = guidance_weights(times, max_guidance_weight)
    dt = torch.tensor(-1.0 / cfg.num_denoise_steps, dtype=torch.float32, device=noise.device)  # openpi's dt
    x = noise.float()
    prev = prev_chunk.to(x.device, torch.float32)
    if mask is None:
        mask = soft_mask(horizon, delay_steps, max(horizon - execute_horizon, 0), schedule)
    mask = mask.to(x.device, torch.float32)
    for t_value, w in zip(times, weights):
        t = torch.full((b,), t_value, dtype=torch.float32, device=x.device)
        velocity = functools.partial(_denoise_velocity, model, prefix, inputs.state, t)
        x = x + dt * guided_velocity(velocity, x, t_value, w, prev, mask, mode)
    return x


def _denoise_velocity(model: Pi0Model, prefix: Prefix, state: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor
                      ) -> torch.Tensor:
    return model.denoise_step(prefix, state, x_t, t)


@torch.no_grad()
def _sample_plain(model: Pi0Model, prefix: Prefix, state: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`Pi0Model.sample_actions` after its prefix: the chain with no previous chunk."""
    b = noise.shape[0]
    dt = torch.tensor(-1.0 / model.cfg.num_denoise_steps, dtype=torch.float32, device=noise.device)
    x = noise.float()
    for t_value in euler_times(model.cfg.num_denoise_steps):
        t = torch.full((b,), t_value, dtype=torch.float32, device=noise.device)
        x = x + dt * model.denoise_step(prefix, state, x, t)
    return x
