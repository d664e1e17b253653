"""SigLIP vision tower (So400m/14 at full size) plus PaliGemma's linear projector.

Pre-LayerNorm ViT, no class token, learned position embeddings, `post_layernorm` at the end, no
attention-pooling head. openpi's patch removes PaliGemma's `/ sqrt(width)` after the projector,
so neither is here (fixture README, `intermediate/image_emb`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pi0_policy_ros.model.config import SiglipConfig


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # [B, nh, S, hd]
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)  # [B, S, D]
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.tokens_per_image, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Patch and position embeddings stay fp32 in bf16 mode, as openpi keeps them.
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [B, D, 16, 16]
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight  # [B, 256, D]


class SiglipVisionTower(nn.Module):
    """uint8-free core: images in [-1, 1], [B, 3, 224, 224] → projected tokens [B, 256, proj]."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.depth))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.projector = nn.Linear(cfg.width, cfg.projection_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels).to(self.layers[0].mlp.fc1.weight.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.projector(self.post_layernorm(x))
