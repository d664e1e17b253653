"""Everything that depends only on the denoise step, computed once at configure time, plus the
suffix attention pattern and positions (which depend only on the prefix pad mask).

pi0.5: the time condition `cond_t = silu(mlp_out(silu(mlp_in(temb(t)))))` gives every adaRMS norm
its `(scale, shift, gate)`. The engine multiplies the plain RMS-normalized rows by `1 + scale`,
and the shift goes through the following linear as a per-step bias (`W·shift`).
pi0: `action_time_mlp_in(cat(action_in_proj(x), temb))` = `(M_a·A)·x + [M_a·a + M_t·temb + b]`;
the bracket is a per-step bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pi0_policy_ros.model.gemma import MASK_VALUE
from pi0_policy_ros.model.pi0 import Pi0Model, euler_times, sinusoidal_time_embedding
from pi0_policy_ros.engine.weights import ExpertWeights


@dataclass
class StepTables:
    """Per denoise step s and expert layer l (float32)."""

    times: list[float]
    # pi0.5 adaRMS (None for pi0): index 0 = input norm, 1 = post-attention norm.
    norm_mul: torch.Tensor | None = None  # [steps, L, 2, W]  1 + scale
    gate: torch.Tensor | None = None  # [steps, L, 2, W]
    qkv_bias: torch.Tensor | None = None  # [steps, L, Nqkv]  W_qkv · shift_in
    gate_up_bias: torch.Tensor | None = None  # [steps, L, 2·mlp]  W_gu · shift_post
    final_mul: torch.Tensor | None = None  # [steps, W]
    out_bias: torch.Tensor | None = None  # [steps, A]  dt·(W_out·shift_final + b_out), or dt·b_out
    # pi0 (None for pi0.5)
    action_time_bias: torch.Tensor | None = None  # [steps, W]

    def to(self, dtype: torch.dtype) -> StepTables:
        """A copy with the per-channel tables in `dtype` (times stay Python floats)."""
        kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return StepTables(**kw)


@torch.no_grad()
def build_step_tables(model: Pi0Model, weights: ExpertWeights, device: torch.device) -> StepTables:
    """Evaluate the model's own time-conditioning modules at the fixed Euler times, in float32."""
    cfg = model.cfg
    times = euler_times(cfg.num_denoise_steps)
    t = torch.tensor(times, dtype=torch.float32, device=device)
    f32 = torch.float32
    if not cfg.pi05:
        w = cfg.expert.width
        temb = sinusoidal_time_embedding(t, w)  # [steps, W]
        mlp_in = model.action_time_mlp_in
        m_t = mlp_in.weight.detach().to(device, f32)[:, w:]
        bias = temb @ m_t.t() + mlp_in.bias.detach().to(device, f32) + weights.action_in.bias
        return StepTables(times, action_time_bias=bias.contiguous(),
                          out_bias=weights.out_head.bias[None].expand(len(times), -1).contiguous())

    def dense(norm: torch.nn.Module, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = cond @ norm.dense.weight.detach().to(device, f32).t() + norm.dense.bias.detach().to(device, f32)
        return out.chunk(3, dim=-1)  # scale, shift, gate; each [steps, W]

    temb = sinusoidal_time_embedding(t, model.action_in_proj.out_features)
    mlp_in, mlp_out = model.time_mlp_in, model.time_mlp_out
    h = torch.nn.functional.silu(temb @ mlp_in.weight.detach().to(device, f32).t() + mlp_in.bias.detach().to(device, f32))
    cond = torch.nn.functional.silu(h @ mlp_out.weight.detach().to(device, f32).t() + mlp_out.bias.detach().to(device, f32))
    muls, gates, qkv_b, gu_b = [], [], [], []
    for layer, lw in zip(model.expert.layers, weights.layers):
        s1, sh1, g1 = dense(layer.input_layernorm, cond)
        s2, sh2, g2 = dense(layer.post_attention_layernorm, cond)
        muls.append(torch.stack((1.0 + s1, 1.0 + s2), dim=1))
        gates.append(torch.stack((g1, g2), dim=1))
        qkv_b.append(sh1 @ lw.qkv.weight.float().t())
        gu_b.append(sh2 @ lw.gate_up.weight.float().t())
    sf, shf, _ = dense(model.expert.norm, cond)
    out_bias = shf @ weights.out_head.weight.t() + weights.out_head.bias
    return StepTables(times, norm_mul=torch.stack(muls, 1).contiguous(), gate=torch.stack(gates, 1).contiguous(),
                      qkv_bias=torch.stack(qkv_b, 1).contiguous(), gate_up_bias=torch.stack(gu_b, 1).contiguous(),
                      final_mul=(1.0 + sf).contiguous(), out_bias=out_bias.contiguous())


def suffix_pattern(suffix_len: int, horizon: int, device: torch.device) -> torch.Tensor:
    """bool [S, S]: may suffix query i attend suffix key j (openpi's ar mask [1, (1,) 0, …])."""
    ar = torch.zeros(suffix_len, dtype=torch.int32, device=device)
    ar[0] = 1
    ar[suffix_len - horizon] = 1
    cum = torch.cumsum(ar, 0)
    return cum[None, :] <= cum[:, None]


def suffix_attention_bias(prefix_pad: torch.Tensor, pattern: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Additive float32 bias [S, P + S] for the suffix queries, written into `out`: 0 where allowed,
    the model's mask value elsewhere. prefix_pad bool [P]."""
    p = prefix_pad.shape[0]
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    masked = torch.full((), MASK_VALUE, dtype=out.dtype, device=out.device)
    out[:, :p].copy_(torch.where(prefix_pad[None, :], zero, masked).expand(pattern.shape[0], p))
    out[:, p:].copy_(torch.where(pattern, zero, masked))
    return out


def suffix_positions(prefix_pad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """int64 [S]: n_valid_prefix + [0, 1, …, S-1] (`offsets` is that arange, made once)."""
    return prefix_pad.sum(dtype=torch.int64) + offsets


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, hd] for int64 positions [N], the model's recipe (fp32 angles, cast to dtype)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)
