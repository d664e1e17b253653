"""One denoise step as ~6 Triton kernels per expert layer (bf16 weights, float32 residual).

Per layer: fused-QKV (norm prologue, RoPE epilogue, K/V written into the cache), split-KV
attention, its combine, o_proj (split-K, `resid += gate ⊙ y` by atomics), gate_up (norm
prologue, GEGLU epilogue), down (split-K, gated residual). Per step: the action input projection
(pi0: + the action-time MLP) and the final norm + output projection + Euler update.
Launch geometry comes from `TritonConfig`; the benchmark compares a few.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pi0_policy_ros.engine import kernels_triton as K
from pi0_policy_ros.engine.buffers import DeviceBuffers
from pi0_policy_ros.engine.tables import StepTables
from pi0_policy_ros.engine.types import EngineShape
from pi0_policy_ros.engine.weights import ExpertWeights
from pi0_policy_ros.errors import ConfigError


@dataclass(frozen=True)
class TritonConfig:
    pair_block_n: int = 32  # 16 → 32: chain 10.3 → 9.0 ms on the H100 (notes)
    pair_block_k: int = 128
    pair_warps: int = 4
    pair_stages: int = 3
    splitk_block_n: int = 32
    splitk_block_k: int = 128
    o_splits: int = 4
    down_splits: int = 4
    splitk_warps: int = 4
    splitk_stages: int = 3
    attn_keys_per_split: int = 64
    attn_block_n: int = 64
    attn_block_r: int = 16
    attn_warps: int = 4
    combine_block_r: int = 16
    combine_block_d: int = 64


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


class TritonDenoiseStep:
    def __init__(self, weights: ExpertWeights, tables: StepTables, shape: EngineShape, buf: DeviceBuffers,
                 config: TritonConfig | None = None) -> None:
        self.w = weights
        self.tables = tables
        self.shape = shape
        self.cfg = config or TritonConfig()
        ec = weights.cfg
        if ec.head_dim // 2 % self.cfg.pair_block_n:
            raise ConfigError(f"pair_block_n {self.cfg.pair_block_n} must divide head_dim/2 = {ec.head_dim // 2}")
        dev = buf.x.device
        s = shape.suffix_len
        self.rows = s * ec.num_heads
        self.n_splits = triton.cdiv(buf.keys.shape[1], self.cfg.attn_keys_per_split)
        f32, bf16 = torch.float32, weights.layers[0].qkv.weight.dtype  # bf16 (fp16 only in interpreter tests)
        self.resid = torch.zeros(s, ec.width, dtype=f32, device=dev)
        self.q = torch.zeros(s, ec.num_heads * ec.head_dim, dtype=bf16, device=dev)
        self.attn = torch.zeros_like(self.q)
        self.act = torch.zeros(s, ec.mlp_dim, dtype=bf16, device=dev)
        self.part_o = torch.zeros(self.n_splits, self.rows, ec.head_dim, dtype=f32, device=dev)
        self.part_ml = torch.zeros(self.n_splits, 2, self.rows, dtype=f32, device=dev)
        self.pre = torch.zeros(shape.action_horizon, ec.width, dtype=f32, device=dev)
        self.dummy = torch.zeros(1, dtype=f32, device=dev)
        self.block_m = _block_m(s)

    # ---- launchers ----------------------------------------------------------------------------
    def _splitk(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, epi: int, bias: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, splits: int = 1) -> None:
        c = self.cfg
        m, k = x.shape
        n = w.shape[0]
        ieee = w.dtype == torch.float32
        block_k = min(c.splitk_block_k, triton.next_power_of_2(k)) if k % c.splitk_block_k else c.splitk_block_k
        splits = max(1, min(splits, k // block_k))
        if k % (splits * block_k):
            raise ConfigError(f"K={k} is not a multiple of splits {splits} × BLOCK_K {block_k}")
        block_n = c.splitk_block_n
        grid = (triton.cdiv(n, block_n), splits)
        K.linear_splitk_kernel[grid](
            x, x.stride(0), w, self.dummy if bias is None else bias, self.dummy if gate is None else gate,
            out, out.stride(0), m, n, k, k // splits,
            EPI=epi, HAS_BIAS=bias is not None, HAS_GATE=gate is not None, IEEE=ieee,
            BLOCK_M=_block_m(m), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=c.splitk_warps, num_stages=c.splitk_stages)

    def _pair(self, w: torch.Tensor, out: torch.Tensor, epi: int, mul: torch.Tensor | None, bias: torch.Tensor | None,
              pair_offset: int, k_out: torch.Tensor | None = None, v_out: torch.Tensor | None = None,
              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> None:
        c, ec = self.cfg, self.w.cfg
        x = self.resid
        pairs = w.shape[0] // 2
        grid = (pairs // c.pair_block_n,)
        d = self.dummy
        K.norm_linear_pair_kernel[grid](
            x, x.stride(0), w, d if mul is None else mul, d if bias is None else bias,
            out, out.stride(0), d if k_out is None else k_out, d if v_out is None else v_out,
            d if cos is None else cos, d if sin is None else sin,
            x.shape[0], x.shape[1], ec.rms_norm_eps, pair_offset,
            EPI=epi, HAS_MUL=mul is not None, HAS_BIAS=bias is not None, NQ=ec.num_heads, HD=ec.head_dim,
            BLOCK_M=self.block_m, BLOCK_N=c.pair_block_n, BLOCK_K=c.pair_block_k,
            num_warps=c.pair_warps, num_stages=c.pair_stages)

    def _attention(self, buf: DeviceBuffers, layer: int) -> None:
        c, ec = self.cfg, self.w.cfg
        keys, values = buf.keys[layer], buf.values[layer]
        grid = (self.n_splits, triton.cdiv(self.rows, c.attn_block_r))
        K.attention_split_kernel[grid](
            self.q, keys, values, buf.suffix_bias, self.part_o, self.part_ml,
            self.rows, keys.shape[0], c.attn_keys_per_split, buf.suffix_bias.stride(0), self.shape.suffix_len,
            ec.head_dim**-0.5, HEADS=ec.num_heads, HD=ec.head_dim, BLOCK_R=c.attn_block_r,
            BLOCK_N=c.attn_block_n, num_warps=c.attn_warps, num_stages=2)
        grid = (triton.cdiv(self.rows, c.combine_block_r), ec.head_dim // c.combine_block_d)
        K.attention_combine_kernel[grid](
            self.part_o, self.part_ml, self.attn, self.rows, self.n_splits,
            HD=ec.head_dim, BLOCK_R=c.combine_block_r, BLOCK_D=c.combine_block_d, num_warps=4)

    # ---- one step -----------------------------------------------------------------------------
    def run(self, buf: DeviceBuffers, step: int) -> None:
        w, tab, shape, ec = self.w, self.tables, self.shape, self.w.cfg
        pp = shape.padded_prefix_len
        ada = shape.pi05
        x_in = buf.x[step]
        if ada:
            self._splitk(x_in, w.action_in.weight, self.resid, K.EPI_STORE, bias=w.action_in.bias)
        else:
            self._splitk(x_in, w.action_in.weight, self.pre, K.EPI_SILU, bias=tab.action_time_bias[step])
            self._splitk(self.pre, w.time_mlp_out.weight, self.resid[1:], K.EPI_STORE, bias=w.time_mlp_out.bias)
            self.resid[0].copy_(buf.state_token)
        for i, lw in enumerate(w.layers):
            self._pair(lw.qkv.weight, self.q, K.EPI_ROPE, tab.norm_mul[step, i, 0] if ada else None,
                       tab.qkv_bias[step, i] if ada else None, 0, k_out=buf.keys[i, pp:], v_out=buf.values[i, pp:],
                       cos=buf.suffix_cos, sin=buf.suffix_sin)
            self._attention(buf, i)
            self._splitk(self.attn, lw.out.weight, self.resid, K.EPI_RESIDUAL,
                         gate=tab.gate[step, i, 0] if ada else None, splits=self.cfg.o_splits)
            self._pair(lw.gate_up.weight, self.act, K.EPI_GEGLU, tab.norm_mul[step, i, 1] if ada else None,
                       tab.gate_up_bias[step, i] if ada else None, ec.mlp_dim)
            self._splitk(self.act, lw.down.weight, self.resid, K.EPI_RESIDUAL,
                         gate=tab.gate[step, i, 1] if ada else None, splits=self.cfg.down_splits)
        hrows = self.resid[shape.suffix_len - shape.action_horizon:]
        out = w.out_head.weight
        n, k = out.shape
        block_n = min(32, triton.next_power_of_2(n))
        K.norm_head_kernel[(triton.cdiv(n, block_n),)](
            hrows, hrows.stride(0), tab.final_mul[step] if ada else self.dummy, out, tab.out_bias[step],
            x_in, buf.x[step + 1], hrows.shape[0], n, k, ec.rms_norm_eps,
            HAS_MUL=ada, ROUND_TO=tl.float16 if self.q.dtype == torch.float16 else tl.bfloat16, BLOCK_M=_block_m(hrows.shape[0]), BLOCK_N=block_n, BLOCK_K=128, num_warps=4)
