"""The GPU tests' model geometry: big enough for the Triton kernels' tiles (head_dim 64, width 256),
small enough to be quick."""

from __future__ import annotations

from pi0_policy_ros.model.config import GemmaConfig, ModelConfig, SiglipConfig

_GEMMA = GemmaConfig(width=256, depth=3, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=64)
_SIGLIP = SiglipConfig(width=128, depth=2, mlp_dim=256, num_heads=4, projection_dim=256)


def medium_config(pi05: bool) -> ModelConfig:
    return ModelConfig("medium", pi05=pi05, siglip=_SIGLIP, paligemma=_GEMMA, expert=_GEMMA,
                       action_horizon=10 if pi05 else 50, max_token_len=200 if pi05 else 48)
