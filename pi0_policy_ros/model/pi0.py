"""pi0 / pi0.5: prefix embedding, prefix forward → KV cache, denoise step, reference sampler.

Conventions (masks, positions, time embedding, Euler direction) are those of the fixture README
`shared/fixtures/openpi_reference/README.md`, which pins openpi's `PI0Pytorch.sample_actions`.
This module is the readable reference: the fast engine is tested against `sample_actions` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pi0_policy_ros.model.config import ModelConfig
from pi0_policy_ros.model.gemma import GemmaStack
from pi0_policy_ros.model.siglip import SiglipVisionTower

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value) [B, nkv, P, hd]


@dataclass
class ModelInputs:
    """What the network consumes, already preprocessed (openpi's `Observation` after transforms).

    images: one [B, 3, 224, 224] float tensor in [-1, 1] per image slot.
    image_masks: one bool [B] per slot; False slots are padding for attention.
    tokens / token_mask: [B, L] int64 / bool.
    state: [B, action_dim] float32, normalized and zero-padded (pi0 only; pi0.5 ignores it).
    """

    images: list[torch.Tensor]
    image_masks: list[torch.Tensor]
    tokens: torch.Tensor
    token_mask: torch.Tensor
    state: torch.Tensor


@dataclass
class Prefix:
    """The prefix forward's result: everything the denoise steps need."""

    kv: KVCache
    pad_mask: torch.Tensor  # bool [B, P]
    last_hidden: torch.Tensor | None = None  # [B, P, D], for checking only


@dataclass
class Trace:
    """Intermediates recorded by `sample_actions(trace=...)`, named like the fixture's."""

    image_embs: list[torch.Tensor] = field(default_factory=list)
    prefix_embs: torch.Tensor | None = None
    prefix: Prefix | None = None
    times: list[torch.Tensor] = field(default_factory=list)
    x_t: list[torch.Tensor] = field(default_factory=list)
    v_t: list[torch.Tensor] = field(default_factory=list)


def make_attention_mask(pad_mask: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """openpi's `make_att_2d_masks`: query i may attend key j iff cumsum(ar)[j] <= cumsum(ar)[i]
    and both are valid. pad/ar [B, N] → bool [B, N, N]."""
    cum = torch.cumsum(ar_mask.to(torch.int32), dim=1)
    causal = cum[:, None, :] <= cum[:, :, None]
    return causal & pad_mask[:, None, :] & pad_mask[:, :, None]


def sinusoidal_time_embedding(t: torch.Tensor, width: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """[sin | cos] of t·2π/period, computed in float64 and returned in t's dtype. t [B] → [B, width]."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t[:, None].to(torch.float64)
    return torch.cat((torch.sin(angle), torch.cos(angle)), dim=1).to(t.dtype)


def euler_times(num_steps: int) -> list[float]:
    """The times fed to each denoise step: t starts at 1 and accumulates dt = -1/num_steps in
    float32, exactly as openpi's loop does (so 0.79999995, not 0.8)."""
    dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
    t = torch.tensor(1.0, dtype=torch.float32)
    times = []
    while t >= -dt / 2:
        times.append(float(t))
        t = t + dt
    return times


class Pi0Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        lm, ex = cfg.paligemma, cfg.expert
        self.vision = SiglipVisionTower(cfg.siglip)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, lm.width)
        self.language_model = GemmaStack(lm)
        self.expert = GemmaStack(ex, cond_dim=ex.width if cfg.pi05 else None)
        self.action_in_proj = nn.Linear(cfg.action_dim, ex.width)
        self.action_out_proj = nn.Linear(ex.width, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(ex.width, ex.width)
            self.time_mlp_out = nn.Linear(ex.width, ex.width)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, ex.width)
            self.action_time_mlp_in = nn.Linear(2 * ex.width, ex.width)
            self.action_time_mlp_out = nn.Linear(ex.width, ex.width)

    # ---- prefix -------------------------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, 224, 224] in [-1, 1] → [N, 256, D_lm]."""
        return self.vision(images)

    def embed_prefix(self, inputs: ModelInputs, image_embs: list[torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Image tokens of every slot, then the prompt tokens scaled by sqrt(width).
        Returns embeddings [B, P, D], pad mask [B, P] and the per-slot image embeddings."""
        if image_embs is None:
            image_embs = [self.embed_images(img) for img in inputs.images]
        text = self.embed_tokens(inputs.tokens)
        text = text * math.sqrt(text.shape[-1])
        embs = torch.cat([*image_embs, text.to(image_embs[0].dtype)], dim=1)
        n_img = image_embs[0].shape[1]
        pad = torch.cat([*(m[:, None].expand(-1, n_img) for m in inputs.image_masks), inputs.token_mask], dim=1)
        return embs, pad, image_embs

    def forward_prefix(self, embs: torch.Tensor, pad_mask: torch.Tensor) -> Prefix:
        """The prefix is fully bidirectional over valid tokens (all ar = 0); masked tokens do not
        advance the positions."""
        positions = torch.cumsum(pad_mask.to(torch.int64), dim=1) - 1
        allowed = make_attention_mask(pad_mask, torch.zeros_like(pad_mask))
        hidden, kv = self.language_model(embs, positions, allowed)
        return Prefix(kv=kv, pad_mask=pad_mask, last_hidden=hidden)

    # ---- suffix -------------------------------------------------------------------------------
    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        """pi0.5: the adaRMS conditioning vector [B, W] for times t [B]."""
        temb = sinusoidal_time_embedding(t, self.action_in_proj.out_features)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pi0.5: H action tokens and the adaRMS condition. pi0: [state token, H action-time
        tokens] and no condition."""
        action_emb = self.action_in_proj(x_t)  # [B, H, W]
        if self.cfg.pi05:
            return action_emb, self.time_condition(t)
        temb = sinusoidal_time_embedding(t, action_emb.shape[-1])[:, None, :].expand_as(action_emb)
        action_time = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat((action_emb, temb), dim=2))))
        state_emb = self.state_proj(state.to(self.state_proj.weight.dtype))[:, None, :]
        return torch.cat((state_emb, action_time), dim=1), None

    def suffix_attention(self, prefix_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Allowed-mask [B, S, P + S] and positions [B, S] of the suffix tokens. They depend only
        on the prefix pad mask, so the engine computes them once per prefix."""
        b = prefix_pad.shape[0]
        s = self.cfg.suffix_len
        ones = torch.ones(b, s, dtype=torch.bool, device=prefix_pad.device)
        ar = torch.zeros(b, s, dtype=torch.bool, device=prefix_pad.device)
        ar[:, 0] = True  # pi0.5: [1, 0, ..., 0]; pi0: [1 (state), 1, 0, ..., 0]
        ar[:, s - self.cfg.action_horizon] = True
        allowed = torch.cat((prefix_pad[:, None, :].expand(b, s, -1), make_attention_mask(ones, ar)), dim=2)
        n_valid = prefix_pad.sum(dim=1, keepdim=True)
        positions = n_valid + torch.arange(s, device=prefix_pad.device)[None, :]
        return allowed, positions

    def denoise_step(self, prefix: Prefix, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity v [B, H, action_dim] at x_t [B, H, action_dim] and times t [B]."""
        embs, cond = self.embed_suffix(state, x_t, t)
        allowed, positions = self.suffix_attention(prefix.pad_mask)
        out, _ = self.expert(embs, positions, allowed, cond=cond, past_kv=prefix.kv)
        out = out[:, -self.cfg.action_horizon:].to(torch.float32)
        return self.action_out_proj(out.to(self.action_out_proj.weight.dtype)).float()

    # ---- reference sampler --------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, inputs: ModelInputs, noise: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """Flow-matching Euler integration from noise at t=1 to actions at t=0 (openpi's
        direction: x_t = t·noise + (1-t)·actions). noise [B, H, action_dim] → actions, same shape."""
        embs, pad, image_embs = self.embed_prefix(inputs)
        prefix = self.forward_prefix(embs, pad)
        if trace is not None:
            trace.image_embs, trace.prefix_embs, trace.prefix = image_embs, embs, prefix
        b = noise.shape[0]
        dt = torch.tensor(-1.0 / self.cfg.num_denoise_steps, dtype=torch.float32)
        x = noise.float()
        for t_value in euler_times(self.cfg.num_denoise_steps):
            t = torch.full((b,), t_value, dtype=torch.float32, device=noise.device)
            v = self.denoise_step(prefix, inputs.state, x, t)
            if trace is not None:
                trace.times.append(t)
                trace.x_t.append(x)
                trace.v_t.append(v)
            x = x + dt.to(x.device) * v
        return x
