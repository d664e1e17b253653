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

import torch
import torch.nn.functional as F

from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.stages import rotate
from pi0_policy_ros.engine.tables import StepTables
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.engine.weights import ExpertWeights


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
        cfg, shape, tab = self.w.cfg, self.shape, self.tables_dt
        pp, s = shape.padded_prefix_len, shape.suffix_len
        nh, hd, width = cfg.num_heads, cfg.head_dim, cfg.width
        eps = cfg.rms_norm_eps
        ada = shape.pi05
        scale = hd**-0.5
        x_in = buf.x[step]
        h_res = self._embed(buf, step, x_in)
        cos, sin = buf.suffix_cos, buf.suffix_sin
        for i, lw in enumerate(self.w.layers):
            h = F.rms_norm(h_res, (width,), eps=eps)
            if ada:
                h = h * tab.norm_mul[step, i, 0]
            qkv = lw.qkv(h) if not ada else torch.addmm(tab.qkv_bias[step, i], h, lw.qkv.weight.t())
            q = rotate(qkv[:, : nh * hd].view(s, nh, hd), cos[:, None], sin[:, None])
            buf.keys[i, pp:].copy_(rotate(qkv[:, nh * hd: nh * hd + hd], cos, sin))
            buf.values[i, pp:].copy_(qkv[:, nh * hd + hd:])
            scores = torch.matmul(q.reshape(s * nh, hd), buf.keys[i].t()).view(s, nh, -1)
            scores = scores.float() * scale + buf.suffix_bias[:, None, :]
            probs = torch.softmax(scores, dim=-1).to(self.dtype).view(s * nh, -1)
            attn = torch.matmul(probs, buf.values[i]).view(s, nh * hd)
            y = lw.out(attn)
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
        out = self.w.out_head
        torch.add(x_in, torch.addmm(self.tables.out_bias[step], h, out.weight.t()), out=buf.x[step + 1])


class DenoiseChain:
    """Owns one step implementation and runs (or, in the engine, captures) the whole chain."""

    def __init__(self, step_impl: TorchDenoiseStep, num_steps: int) -> None:
        self.step_impl = step_impl
        self.num_steps = num_steps

    def run_step(self, buf: DeviceBuffers, step: int) -> None:
        self.step_impl.run(buf, step)

    def run(self, buf: DeviceBuffers) -> None:
        for step in range(self.num_steps):
            self.step_impl.run(buf, step)
