"""The denoise chain: `num_steps` Euler steps of the action expert over a static KV cache.

Step k reads x[k] and writes x[k + 1] (`DeviceBuffers.x`), so the steps can be captured as
separate CUDA graphs and replayed back to back. Each step writes its own suffix K/V into rows
[Pp, Pp + S) of the cache, so attention reads one contiguous [Pp + S, hd] block per layer.

Two implementations of one step:
- `torch`: plain torch ops (every precision; the reference for the kernels).
- `triton`: bf16, fused kernels from `kernels_triton` (norm in the linear's prologue, RoPE,
  GEGLU and gated residuals in its epilogue, split-KV attention); the residual stream is kept in
  float32, which lets the row-reducing linears split K and accumulate with atomics.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.rowops import rotate
from pi0_policy_ros.engine.tables import StepTables
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.engine.weights import ExpertWeights


class DenoiseStep(Protocol):
    """One step implementation: reads x[step], writes x[step + 1] (capturable as a CUDA graph)."""

    def run(self, buf: DeviceBuffers, step: int) -> None: ...


class TorchDenoiseStep:
    def __init__(self, weights: ExpertWeights, tables: StepTables, shape: EngineShape, dtype: torch.dtype) -> None:
        self.w = weights
        self.tables = tables
        self.tables_dt = tables.to(dtype)
        self.shape = shape
        self.dtype = dtype

    def _embed(self, buf: DeviceBuffers, step: int, x: torch.Tensor) -> torch.Tensor:
        w, tab = self.w, self.tables
        if self.shape.pi05:
            return w.action_in(x).to(self.dtype)  # [H, W]
        pre = F.silu(torch.addmm(tab.action_time_bias[step], x, w.action_in.weight.t()))
        action_time = w.time_mlp_out(pre)
        return torch.cat((buf.state_token[None], action_time), dim=0).to(self.dtype)  # [1 + H, W]

    def run(self, buf: DeviceBuffers, step: int) -> None:
        """x[step + 1] = x[step] + dt·v, writing this step's suffix K/V into the cache."""
        x_in = buf.x[step]
        torch.add(x_in, self._delta(buf, step, x_in, write_cache=True), out=buf.x[step + 1])

    def delta(self, buf: DeviceBuffers, step: int, x: torch.Tensor) -> torch.Tensor:
        """dt·v(x) [H, A] float32 (dt is folded into the output head), differentiable in x: no
        buffer is written, the suffix K/V stay local (RTC's vector-Jacobian product)."""
        return self._delta(buf, step, x, write_cache=False)

    def _delta(self, buf: DeviceBuffers, step: int, x_in: torch.Tensor, write_cache: bool) -> torch.Tensor:
        cfg, shape, tab = self.w.cfg, self.shape, self.tables_dt
        pp, s = shape.padded_prefix_len, shape.suffix_len
        nh, hd, width = cfg.num_heads, cfg.head_dim, cfg.width
        eps = cfg.rms_norm_eps
        ada = shape.pi05
        scale = hd**-0.5
        h_res = self._embed(buf, step, x_in)
        cos, sin = buf.suffix_cos, buf.suffix_sin
        for i, lw in enumerate(self.w.layers):
            h = F.rms_norm(h_res, (width,), eps=eps)
            if ada:
                h = h * tab.norm_mul[step, i, 0]
            qkv = lw.qkv(h) if not ada else torch.addmm(tab.qkv_bias[step, i], h, lw.qkv.weight.t())
            q = rotate(qkv[:, : nh * hd].view(s, nh, hd), cos[:, None], sin[:, None]).reshape(s * nh, hd)
            k = rotate(qkv[:, nh * hd: nh * hd + hd], cos, sin)
            v = qkv[:, nh * hd + hd:]
            if write_cache:
                buf.keys[i, pp:].copy_(k)
                buf.values[i, pp:].copy_(v)
                scores = torch.matmul(q, buf.keys[i].t())
            else:
                # The same scores without touching the cache: prefix keys, then this step's keys.
                scores = torch.cat((torch.matmul(q, buf.keys[i, :pp].t()), torch.matmul(q, k.t())), dim=1)
            scores = scores.view(s, nh, -1).float() * scale + buf.suffix_bias[:, None, :]
            probs = torch.softmax(scores, dim=-1).to(self.dtype).view(s * nh, -1)
            if write_cache:
                attn = torch.matmul(probs, buf.values[i])
            else:
                attn = torch.matmul(probs[:, :pp], buf.values[i, :pp]) + torch.matmul(probs[:, pp:], v)
            y = lw.out(attn.view(s, nh * hd))
            h_res = h_res + (y * tab.gate[step, i, 0] if ada else y)
            h = F.rms_norm(h_res, (width,), eps=eps)
            if ada:
                h = h * tab.norm_mul[step, i, 1]
            gu = lw.gate_up(h) if not ada else torch.addmm(tab.gate_up_bias[step, i], h, lw.gate_up.weight.t())
            mlp = gu.shape[1] // 2
            y = lw.down(F.gelu(gu[:, :mlp], approximate="tanh") * gu[:, mlp:])
            h_res = h_res + (y * tab.gate[step, i, 1] if ada else y)
        h = F.rms_norm(h_res[-shape.action_horizon:], (width,), eps=eps)
        if ada:
            h = h * tab.final_mul[step]
        h = h.float()
        return torch.addmm(self.tables.out_bias[step], h, self.w.out_head.weight.t())


class DenoiseChain:
    """Owns one step implementation and runs (or, in the engine, captures) the whole chain."""

    def __init__(self, step_impl: DenoiseStep, num_steps: int) -> None:
        self.step_impl = step_impl
        self.num_steps = num_steps

    def run_step(self, buf: DeviceBuffers, step: int) -> None:
        self.step_impl.run(buf, step)

    def run(self, buf: DeviceBuffers) -> None:
        for step in range(self.num_steps):
            self.step_impl.run(buf, step)
