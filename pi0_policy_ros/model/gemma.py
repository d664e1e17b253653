"""Gemma decoder stack: one block type, with optional adaRMS time conditioning (pi0.5 expert).

Numerics follow openpi's patched transformers Gemma (fixture README, "Gemma details"):
- RMSNorm: variance in fp32, `x * rsqrt(mean(x²) + eps) * (1 + w)`; no input `* sqrt(width)`
  scaling inside the stack (openpi's patch removes it; `embed_prefix` scales the text itself).
- adaRMS: `dense(cond)` → (scale, shift, gate); `normed * (1 + scale) + shift`, and the residual
  becomes `x + y * gate`.
- RoPE with the rotate-half convention, cos/sin computed in fp32 and cast to the activations' dtype.
- Eager attention: additive mask of -2.3819763e38 (not -inf, so that a fully masked pad row gives a
  uniform softmax exactly as openpi does), softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pi0_policy_ros.model.config import GemmaConfig

# openpi's OPENPI_ATTENTION_MASK_VALUE: what masked logits get added (the engine's prefix and suffix biases).
MASK_VALUE = -2.3819763e38
# What `additive_mask` gives a masked key instead, for SDPA. With MASK_VALUE, CUDA's memory-efficient and
# cuDNN kernels return 0 for a padded query row whose every key is masked, not openpi's uniform
# average (bench/sdpa_masked_rows_probe.py, run 162; prefix_last_hidden 3.9 off the fixture on the
# H100 in run 161, the actions unchanged, as no valid row reads a padded one). Any logit offset
# this large masks the same: exp(-1e30 - max) is 0, and a row masked everywhere stays uniform.
SDPA_MASK_VALUE = -1e30


class RMSNorm(nn.Module):
    """Gemma RMSNorm; with `cond_dim` it is adaRMS and also returns the residual gate."""

    def __init__(self, width: int, eps: float, cond_dim: int | None = None) -> None:
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(width))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        var = x.float().square().mean(dim=-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)  # promotes to fp32
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("an adaRMS norm needs its conditioning vector")
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)  # each [B, 1, D]
        normed = normed * (1.0 + scale.float()) + shift.float()
        return normed.to(x.dtype), gate.to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, S, head_dim] for integer positions [B, S]."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [hd/2]
    freqs = positions.float()[..., None] * inv_freq  # [B, S, hd/2]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, nh, S, hd]; cos/sin [B, S, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
    """Eager grouped-query attention. q [B, nh, Sq, hd], k/v [B, nkv, Sk, hd], mask [B, 1, Sq, Sk].

    torch's fused SDPA, not matmul → softmax → matmul: the same float32 result to ~3e-7, without the
    [B, nh, Sq, Sk] score tensors in memory; 3.3× faster on the CPU at the demo's 968-row prefix
    (one thread). Rows with every key masked get uniform weights, as in openpi, with the masks
    `additive_mask` makes (SDPA_MASK_VALUE: finite, and safe in CUDA's fused kernels)."""
    b, nh, sq, hd = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    # Each KV head serves nh / nkv query heads. expand (not repeat_interleave) keeps ONNX tracing
    # on the tensors' device.
    k = k[:, :, None].expand(b, nkv, nh // nkv, sk, hd).reshape(b, nh, sk, hd)
    v = v[:, :, None].expand(b, nkv, nh // nkv, sk, hd).reshape(b, nh, sk, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask.to(q.dtype))
    return out.transpose(1, 2).reshape(b, sq, nh * hd)  # [B, Sq, nh*hd]


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [B, Sq, Sk] (True = may attend) → fp32 [B, 1, Sq, Sk] to add to the logits: 0 or
    SDPA_MASK_VALUE. Built once per forward for every layer's `attention`."""
    zero = torch.zeros((), dtype=torch.float32, device=allowed.device)
    return torch.where(allowed[:, None], zero, torch.full_like(zero, SDPA_MASK_VALUE))


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, D] → q [B, nh, S, hd], k and v [B, nkv, S, hd], RoPE applied to q and k."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cond: torch.Tensor | None = None,
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block. With `past_kv`, queries attend over cat(past, own) keys (the cache is not
        extended). Returns the new hidden states and this block's own (k, v)."""
        h, gate = self.input_layernorm(x, cond)
        q, k, v = self.self_attn.project_qkv(h, cos, sin)
        keys, values = (k, v) if past_kv is None else (torch.cat((past_kv[0], k), 2), torch.cat((past_kv[1], v), 2))
        attn = attention(q, keys.to(q.dtype), values.to(q.dtype), mask)
        x = gated_residual(x, self.self_attn.o_proj(attn), gate)
        h, gate = self.post_attention_layernorm(x, cond)
        return gated_residual(x, self.mlp(h), gate), k, v


class GemmaStack(nn.Module):
    """The decoder layers and the final norm (the token embedding lives with the caller)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layers[0].self_attn.q_proj.weight.dtype

    def forward(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                cond: torch.Tensor | None = None,
                past_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """x [B, S, D], positions [B, S], allowed bool [B, S, S_past + S].
        Returns the final-normed output [B, S, D] and each layer's own (k, v) [B, nkv, S, hd]."""
        x = x.to(self.compute_dtype)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = additive_mask(allowed)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, cond, None if past_kv is None else past_kv[i])
            kv.append((k, v))
        out, _ = self.norm(x, cond)
        return out, kv
