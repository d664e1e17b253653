"""`rtc` (the true vector-Jacobian product) on the Triton denoise kernels.

The torch form (`guidance.RtcStep`) differentiates the unfused torch step with autograd: 6× the
plain Triton chain on the H100. Here the forward is the plain Triton step with `ForwardSaves`
(a few extra stores per layer), and the backward is written out by hand for the activations only:
per layer four skinny products `dy · W` (cuBLAS; the transposed forward products) and five small
kernels (`kernels_rtc_triton`) between them. Every buffer is static, so the step captures as one
CUDA graph like the others. The maths is `guidance.RtcStep`'s:

    x̂ = x − (t/dt)·δ(x),  e = W ⊙ (Y − x̂),  x[k+1] = x + δ − dt·w·(e − (t/dt)·J_δᵀ e)

with δ = dt·v, the step's update (dt folded into the output head).
"""

from __future__ import annotations

import torch
import triton

from pi0_policy_ros.engine import kernels_rtc_triton as KB
from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.denoise_triton import ForwardSaves, TritonDenoiseStep
from pi0_policy_ros.engine.guidance import GuidanceBuffers, GuidanceSchedule
from pi0_policy_ros.engine.tables import StepTables
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.engine.weights import ExpertWeights


BACKWARD_BLOCK_R, BACKWARD_BLOCK_N = 16, 64  # attention backward tiles (any key split: the loop masks its end)


class TritonExpertVjp:
    """J_δᵀ·c for the step the forward (`saves` set) has just run: c [H, A] float32 → [H, A]."""

    def __init__(self, forward: TritonDenoiseStep) -> None:
        if forward.saves is None:
            raise ValueError("the forward step must save its activations (TritonDenoiseStep(saves=...))")
        self.fwd = forward
        w, shape = forward.w, forward.shape
        ec = w.cfg
        s, dev = shape.suffix_len, forward.resid.device
        act = w.layers[0].qkv.weight.dtype
        f32 = torch.float32

        def zeros(*size: int, dtype: torch.dtype = act) -> torch.Tensor:
            return torch.zeros(size, dtype=dtype, device=dev)

        self.dh = zeros(s, ec.width, dtype=f32)  # rows before the action rows stay zero
        self.dr = zeros(s, ec.width, dtype=f32)  # the residual stream's gradient
        self.dy = zeros(s, ec.width)  # the next product's input (dr ⊙ gate)
        self.g = zeros(s, ec.width)  # a norm's input gradient before the norm
        self.dact = zeros(s, ec.mlp_dim)
        self.dgu = zeros(s, 2 * ec.mlp_dim)
        self.do = zeros(s, ec.num_heads * ec.head_dim)
        self.dq = zeros(s * ec.num_heads, ec.head_dim, dtype=f32)  # atomics; zeroed by rope_backward
        self.dk = zeros(s, ec.head_dim, dtype=f32)
        self.dv = zeros(s, ec.head_dim, dtype=f32)
        self.dqkv = zeros(s, (ec.num_heads + 2) * ec.head_dim)
        h = shape.action_horizon
        self.z = None if shape.pi05 else zeros(h, ec.width, dtype=f32)  # pi0: the action-time MLP's input
        self.dpre = None if shape.pi05 else zeros(h, ec.width, dtype=f32)
        self.block_w = triton.next_power_of_2(ec.width)
        self.geglu_block = min(1024, triton.next_power_of_2(ec.mlp_dim))

    def _rms(self, x: torch.Tensor, g: torch.Tensor, mul: torch.Tensor | None, gate: torch.Tensor | None,
             accumulate: bool) -> None:
        d = self.fwd.dummy
        KB.rms_backward_kernel[(x.shape[0],)](
            x, g, d if mul is None else mul, self.dr, self.dy, d if gate is None else gate, x.shape[1],
            self.fwd.w.cfg.rms_norm_eps, HAS_MUL=mul is not None, HAS_GATE=gate is not None,
            ACCUMULATE=accumulate, BLOCK_W=self.block_w, num_warps=4)

    def _attention(self, buf: DeviceBuffers, layer: int) -> None:
        f, sv, ec, c = self.fwd, self.fwd.saves, self.fwd.w.cfg, self.fwd.cfg
        keys = buf.keys[layer]
        # The forward's key splits (its lse covers them), but the backward's own tiles: 16 rows and 64
        # keys at hd 256 fit every GPU in one stage (3 stages ask for 232 KB, over the H100's limit).
        grid = (f.n_splits, triton.cdiv(f.rows, BACKWARD_BLOCK_R))
        KB.attention_backward_kernel[grid](
            sv.q[layer], keys, buf.values[layer], buf.suffix_bias, sv.lse[layer], sv.attn[layer], self.do,
            self.dq, self.dk, self.dv, f.rows, keys.shape[0], f.shape.padded_prefix_len, c.attn_keys_per_split,
            buf.suffix_bias.stride(0), f.shape.suffix_len, ec.head_dim**-0.5,
            HEADS=ec.num_heads, HD=ec.head_dim, BLOCK_R=BACKWARD_BLOCK_R, BLOCK_N=BACKWARD_BLOCK_N, num_warps=8,
            num_stages=1)
        KB.rope_backward_kernel[(f.shape.suffix_len, ec.num_heads + 2)](
            self.dq, self.dk, self.dv, buf.suffix_cos, buf.suffix_sin, self.dqkv, NQ=ec.num_heads, HD=ec.head_dim,
            num_warps=1)

    def run(self, buf: DeviceBuffers, step: int, cot: torch.Tensor, out: torch.Tensor) -> None:
        f, sv, tab, shape = self.fwd, self.fwd.saves, self.fwd.tables, self.fwd.shape
        w, ec = f.w, f.w.cfg
        ada = shape.pi05
        s, h = shape.suffix_len, shape.action_horizon
        n_layers = len(w.layers)

        def gate(layer: int, which: int) -> torch.Tensor | None:
            return tab.gate[step, layer, which] if ada and layer >= 0 else None

        def mul(layer: int, which: int) -> torch.Tensor | None:
            return tab.norm_mul[step, layer, which] if ada else None

        # Output head (float32 weights): δ = bf16(norm(r_L) ⊙ final_mul)·Wᵀ + b on the action rows.
        torch.mm(cot, w.out_head.weight, out=self.dh[s - h:])
        self._rms(f.resid, self.dh, tab.final_mul[step] if ada else None, gate(n_layers - 1, 1), accumulate=False)
        for i in reversed(range(n_layers)):
            lw = w.layers[i]
            torch.mm(self.dy, lw.down.weight, out=self.dact)
            KB.geglu_backward_kernel[(s, triton.cdiv(ec.mlp_dim, self.geglu_block))](
                self.dact, sv.pre[i], self.dgu, ec.mlp_dim, BLOCK=self.geglu_block, num_warps=4)
            torch.mm(self.dgu, lw.gate_up.weight, out=self.g)
            self._rms(sv.resid[i, 1], self.g, mul(i, 1), gate(i, 0), accumulate=True)
            torch.mm(self.dy, lw.out.weight, out=self.do)
            self._attention(buf, i)
            torch.mm(self.dqkv, lw.qkv.weight, out=self.g)
            self._rms(sv.resid[i, 0], self.g, mul(i, 0), gate(i - 1, 1), accumulate=True)
        if ada:  # r_0 = x·W_inᵀ + b
            torch.mm(self.dr, w.action_in.weight, out=out)
            return
        # pi0: r_0 = [state token; W_out·silu(z) + b], z = x·W_inᵀ + b_t (the state row has no x)
        torch.addmm(tab.action_time_bias[step], buf.x[step], w.action_in.weight.t(), out=self.z)
        torch.mm(self.dr[1:], w.time_mlp_out.weight, out=self.dpre)
        sig = torch.sigmoid(self.z)
        self.dpre.mul_(sig * (1.0 + self.z * (1.0 - sig)))
        torch.mm(self.dpre, w.action_in.weight, out=out)


class TritonRtcStep:
    """The Triton step with the true-VJP guidance (`guidance.RtcStep`'s maths)."""

    def __init__(self, forward: TritonDenoiseStep, guide: GuidanceBuffers, times: list[float],
                 max_guidance_weight: float) -> None:
        self.fwd = forward
        self.vjp = TritonExpertVjp(forward)
        self.guide = guide
        self.schedule = GuidanceSchedule.build(times, max_guidance_weight)
        size = guide.prev.shape
        dev = guide.prev.device
        self.err = torch.zeros(size, device=dev)
        self.cot = torch.zeros(size, device=dev)
        self.gx = torch.zeros(size, device=dev)

    @classmethod
    def build(cls, weights: ExpertWeights, tables: StepTables, shape: EngineShape, buf: DeviceBuffers,
              guide: GuidanceBuffers, max_guidance_weight: float) -> TritonRtcStep:
        saves = ForwardSaves.allocate(weights, shape.suffix_len, buf.x.device)
        forward = TritonDenoiseStep(weights, tables, shape, buf, saves=saves)
        return cls(forward, guide, tables.times, max_guidance_weight)

    def run(self, buf: DeviceBuffers, step: int) -> None:
        self.fwd.run(buf, step)  # x[k+1] = x + δ, activations saved
        x, x_next, g, sc = buf.x[step], buf.x[step + 1], self.guide, self.schedule
        ratio = sc.times[step] / sc.dt
        # x̂ = x − (t/dt)·δ = x − ratio·(x_next − x);  e = W ⊙ (Y − x̂)
        torch.add(x * (1.0 + ratio), x_next, alpha=-ratio, out=self.err)
        torch.sub(g.prev, self.err, out=self.err)
        self.err.mul_(g.mask)
        torch.mul(self.err, -ratio, out=self.cot)
        self.vjp.run(buf, step, self.cot, self.gx)  # J_δᵀ·(−ratio·e)
        self.gx.add_(self.err)  # the VJP of x̂
        x_next.add_(self.gx, alpha=-sc.dt * sc.weights[step])
