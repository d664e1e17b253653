"""The engine's own copy of the weights: fused and folded once at configure time.

Same function as the eager model, fewer and larger matmuls:
- q/k/v become one `qkv` matrix, gate/up one `gate_up` matrix (gate rows first).
- An affine norm's gain goes into the next linear: `W·(n ⊙ g) + c = (W·diag g)·n + c`; a LayerNorm's
  bias becomes the linear's bias `W·b + c`. Gemma's RMSNorm gain is `(1 + w)`.
- pi0.5's adaRMS norms have no gain; their per-step scale/shift/gate live in `tables.StepTables`.
- The action output projection is pre-multiplied by the Euler step `dt` (and by the final norm's
  gain for pi0), so a denoise step ends in `x ← x + W'·h + b'`.
- The last PaliGemma layer only has to produce its K/V (the suffix never reads the prefix's
  hidden states), so only its norm and K/V rows are kept.
Folding happens in float32; the result is rounded once to the compute dtype. Action heads stay
float32, as openpi keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pi0_policy_ros.model.config import GemmaConfig, SiglipConfig
from pi0_policy_ros.model.gemma import GemmaStack
from pi0_policy_ros.model.pi0 import Pi0Model
from pi0_policy_ros.model.siglip import SiglipVisionTower

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class Linear:
    """y = x·Wᵀ + b. With `scale` the weight is float8 e4m3 and `scale` its per-output-channel
    dequantization factor [1, N] (row-wise `torch._scaled_mm`)."""

    weight: torch.Tensor  # [N, K]
    bias: torch.Tensor | None = None  # [N], the weight's dtype (float32 for FP8 weights)
    scale: torch.Tensor | None = None  # [1, N] float32, FP8 only
    fast_accum: bool = False  # FP8 only: cuBLASLt's fast accumulation (no periodic float32 promotion)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return fp8_linear(x, self)
        if self.bias is None:
            return torch.matmul(x, self.weight.t())
        return torch.addmm(self.bias, x, self.weight.t())

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(x·Wᵀ + b). On CUDA the GELU runs in cuBLASLt's GEMM epilogue (its tanh form,
        checked against F.gelu in test/gpu/test_engine_gpu.py): one kernel, no extra pass over the
        [P, mlp] output. The CPU's `_addmm_activation` uses the erf form, hence two ops there."""
        if x.is_cuda and self.scale is None and self.bias is not None:
            return torch._addmm_activation(self.bias, x, self.weight.t(), use_gelu=True)
        return torch.nn.functional.gelu(self(x), approximate="tanh")

    def add_into(self, resid: torch.Tensor, x: torch.Tensor) -> None:
        """resid += x·Wᵀ (+ b), in place. Without bias or FP8 that is one GEMM with β = 1 (the
        residual read in its epilogue, one rounding), instead of a GEMM and an add kernel."""
        if self.scale is None and self.bias is None:
            resid.addmm_(x, self.weight.t())
        else:
            resid += self(x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric e4m3 quantization: x [M, K] → (xq [M, K], scale [M, 1] float32)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12)
    scale = amax / FP8_MAX
    xq = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def fp8_linear(x: torch.Tensor, lin: Linear, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """bf16 x [M, K] against an FP8 weight: activations quantized per token on the fly (or
    already quantized by the caller: `quantized` = (xq, scale))."""
    if quantized is None:
        from pi0_policy_ros.engine.rowops import quantize_rows as quantize
        quantized = quantize(x)
    xq, sx = quantized
    y = torch._scaled_mm(xq, lin.weight.t(), scale_a=sx, scale_b=lin.scale, out_dtype=torch.bfloat16,
                         use_fast_accum=lin.fast_accum)
    return y if lin.bias is None else y + lin.bias


def to_fp8(lin: Linear, fast_accum: bool = False) -> Linear:
    """Per-output-channel e4m3 weights; the bias (if any) is kept in float32."""
    w = lin.weight.float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX)  # [N]
    wq = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    bias = None if lin.bias is None else lin.bias.float()
    return Linear(wq.contiguous(), bias, scale[None, :].contiguous(), fast_accum)


def _linear(weights: list[torch.Tensor], dtype: torch.dtype, device: torch.device, gain: torch.Tensor | None = None,
            pre_bias: torch.Tensor | None = None, biases: list[torch.Tensor | None] | None = None) -> Linear:
    """Concatenate [N_i, K] matrices along N, fold an input gain [K] and an input bias [K]."""
    w = torch.cat([t.detach().to(device, torch.float32) for t in weights], dim=0)
    b = None
    if biases is not None and any(x is not None for x in biases):
        b = torch.cat([(x.detach().to(device, torch.float32) if x is not None
                        else torch.zeros(t.shape[0], device=device)) for t, x in zip(weights, biases)])
    if pre_bias is not None:
        extra = w @ pre_bias.detach().to(device, torch.float32)
        b = extra if b is None else b + extra
    if gain is not None:
        w = w * gain.detach().to(device, torch.float32)[None, :]
    return Linear(w.to(dtype).contiguous(), None if b is None else b.to(dtype))


# ---- SigLIP ---------------------------------------------------------------------------------------
@dataclass
class SiglipLayerWeights:
    qkv: Linear  # layer_norm1 folded
    out: Linear
    fc1: Linear  # layer_norm2 folded
    fc2: Linear


@dataclass
class VisionWeights:
    cfg: SiglipConfig
    patch_matrix: torch.Tensor  # [W, 3·p·p] float32 like openpi: the patch conv as a matmul, (c, i, j) columns
    position_bias: torch.Tensor  # [T, W] float32: position embedding + the conv's bias
    layers: list[SiglipLayerWeights]
    head: Linear  # post_layernorm folded into the projector


def fuse_vision(tower: SiglipVisionTower, cfg: SiglipConfig, dtype: torch.dtype, device: torch.device) -> VisionWeights:
    layers = []
    for layer in tower.layers:
        att, ln1, ln2, mlp = layer.self_attn, layer.layer_norm1, layer.layer_norm2, layer.mlp
        layers.append(SiglipLayerWeights(
            qkv=_linear([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], dtype, device, gain=ln1.weight,
                        pre_bias=ln1.bias, biases=[att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
            out=_linear([att.out_proj.weight], dtype, device, biases=[att.out_proj.bias]),
            fc1=_linear([mlp.fc1.weight], dtype, device, gain=ln2.weight, pre_bias=ln2.bias, biases=[mlp.fc1.bias]),
            fc2=_linear([mlp.fc2.weight], dtype, device, biases=[mlp.fc2.bias]),
        ))
    emb = tower.embeddings
    return VisionWeights(
        cfg=cfg,
        patch_matrix=emb.patch_embedding.weight.detach().to(device, torch.float32).flatten(1).contiguous(),
        position_bias=(emb.position_embedding.weight.detach().float()
                       + emb.patch_embedding.bias.detach().float()).to(device).contiguous(),
        layers=layers,
        head=_linear([tower.projector.weight], dtype, device, gain=tower.post_layernorm.weight,
                     pre_bias=tower.post_layernorm.bias, biases=[tower.projector.bias]),
    )


# ---- Gemma ----------------------------------------------------------------------------------------
@dataclass
class GemmaLayerWeights:
    qkv: Linear  # [nh·hd + 2·nkv·hd, W] (only the K/V rows for a KV-only layer)
    out: Linear | None
    gate_up: Linear | None  # [2·mlp, W], gate rows first
    down: Linear | None


def _norm_gain(norm: nn.Module) -> torch.Tensor | None:
    """Gemma RMSNorm's multiplier (1 + w), or None for an adaRMS norm (per-step tables)."""
    return None if norm.dense is not None else 1.0 + norm.weight.detach().float()


def fuse_gemma(stack: GemmaStack, dtype: torch.dtype, device: torch.device, kv_only_last: bool) -> list[GemmaLayerWeights]:
    layers = []
    for i, layer in enumerate(stack.layers):
        att, mlp = layer.self_attn, layer.mlp
        g_in, g_post = _norm_gain(layer.input_layernorm), _norm_gain(layer.post_attention_layernorm)
        if kv_only_last and i == len(stack.layers) - 1:
            layers.append(GemmaLayerWeights(_linear([att.k_proj.weight, att.v_proj.weight], dtype, device, g_in),
                                            None, None, None))
            continue
        layers.append(GemmaLayerWeights(
            qkv=_linear([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], dtype, device, g_in),
            out=_linear([att.o_proj.weight], dtype, device),
            gate_up=_linear([mlp.gate_proj.weight, mlp.up_proj.weight], dtype, device, g_post),
            down=_linear([mlp.down_proj.weight], dtype, device),
        ))
    return layers


@dataclass
class PrefixWeights:
    cfg: GemmaConfig
    embed: torch.Tensor  # [V, W] token table, compute dtype
    layers: list[GemmaLayerWeights]


def fuse_prefix(model: Pi0Model, dtype: torch.dtype, device: torch.device, fp8: bool) -> PrefixWeights:
    layers = fuse_gemma(model.language_model, dtype, device, kv_only_last=True)
    if fp8:
        # Only the MLP: at the prefix's 544-968 rows the row-scaled FP8 GEMM is slower than bf16 for
        # qkv and out (H100, 544 rows: 18 vs 15 and 18 vs 14 µs, before quantizing their inputs) and
        # faster for gate_up (74 µs with fast accumulation, 99 without, bf16 107) and down (52 vs
        # 68). Fast accumulation only for gate_up's K = 2048 (down's 16384 gains nothing from it).
        for lw in layers:
            if lw.gate_up is not None:
                lw.gate_up = to_fp8(lw.gate_up, fast_accum=True)
                lw.down = to_fp8(lw.down)
    embed = model.embed_tokens.weight.detach().to(device, dtype).contiguous()
    return PrefixWeights(model.cfg.paligemma, embed, layers)


@dataclass
class ExpertWeights:
    """The action expert and its heads. Heads are float32."""

    cfg: GemmaConfig
    layers: list[GemmaLayerWeights]
    action_in: Linear  # pi0.5: action_in_proj. pi0: action_in_proj folded into action_time_mlp_in
    out_head: Linear  # dt · action_out_proj (· final-norm gain for pi0)
    time_mlp_out: Linear | None  # pi0 only: action_time_mlp_out
    state_proj: Linear | None  # pi0 only


def fuse_expert(model: Pi0Model, dtype: torch.dtype, device: torch.device) -> ExpertWeights:
    cfg = model.cfg
    f32 = torch.float32
    dt = -1.0 / cfg.num_denoise_steps
    layers = fuse_gemma(model.expert, dtype, device, kv_only_last=False)
    final_gain = _norm_gain(model.expert.norm)
    out_w = model.action_out_proj.weight.detach().to(device, f32) * dt
    if final_gain is not None:
        out_w = out_w * final_gain.to(device)[None, :]
    out_head = Linear(out_w.contiguous(), (model.action_out_proj.bias.detach().to(device, f32) * dt).contiguous())
    if cfg.pi05:
        action_in = Linear(model.action_in_proj.weight.detach().to(device, f32).contiguous(),
                           model.action_in_proj.bias.detach().to(device, f32).contiguous())
        return ExpertWeights(cfg.expert, layers, action_in, out_head, None, None)
    w = cfg.expert.width
    a_w = model.action_in_proj.weight.detach().to(device, f32)  # [W, A]
    a_b = model.action_in_proj.bias.detach().to(device, f32)
    mix = model.action_time_mlp_in.weight.detach().to(device, f32)[:, :w]  # the action half of cat(action, time)
    action_in = Linear((mix @ a_w).contiguous(), (mix @ a_b).contiguous())  # the time half is in the step table
    lin = model.action_time_mlp_out
    time_out = Linear(lin.weight.detach().to(device, f32).contiguous(), lin.bias.detach().to(device, f32).contiguous())
    sp = model.state_proj
    state = Linear(sp.weight.detach().to(device, f32).contiguous(), sp.bias.detach().to(device, f32).contiguous())
    return ExpertWeights(cfg.expert, layers, action_in, out_head, time_out, state)
