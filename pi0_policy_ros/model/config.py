"""Model geometry: frozen dataclasses and named presets.

The real geometries are openpi's `gemma_2b`, `gemma_300m` and SigLIP So400m/14. The two small
presets are the reference fixtures' geometry (`shared/fixtures/openpi_reference/README.md`):
openpi's `dummy` Gemma variant for both experts and a 2-layer SigLIP, with the real sequence
geometry (3 × 256 image tokens, prompt length, horizon, action dim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from pi0_policy_ros.errors import ConfigError

IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
PALIGEMMA_VOCAB_SIZE = 257152
# Gemma's context window (`max_position_embeddings` of Gemma 2B and of PaliGemma's language model):
# image tokens, prompt and action tokens together; the backbone saw no later position in training.
GEMMA_MAX_POSITIONS = 8192
# The most steps for which `pi0.euler_times` gives exactly `num_steps` times. Above it the float32 sum
# drifts (5859 steps give 5860 times, 10000 give 9999), and from about 3.4e7 steps t + dt rounds
# back to 1.0: the loop never ends and its list grows until the OOM killer.
MAX_DENOISE_STEPS = 5858


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


@dataclass(frozen=True)
class SiglipConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    projection_dim: int
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    """Geometry of a pi0 (`pi05=False`) or pi0.5 (`pi05=True`) network."""

    name: str
    pi05: bool
    siglip: SiglipConfig
    paligemma: GemmaConfig
    expert: GemmaConfig
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 48
    num_denoise_steps: int = 10
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    num_image_slots: int = 3
    # pi0.5 only: the normalized state goes into the prompt as discretized text (openpi's default
    # for pi0.5; pi05_libero turns it off).
    discrete_state_input: bool = False

    def __post_init__(self) -> None:
        if self.siglip.projection_dim != self.paligemma.width:
            raise ConfigError(
                f"SigLIP projection_dim ({self.siglip.projection_dim}) must equal the PaliGemma width "
                f"({self.paligemma.width})"
            )
        if self.paligemma.depth != self.expert.depth:
            raise ConfigError(
                f"the action expert attends to every PaliGemma layer's KV cache, so depths must match: "
                f"paligemma {self.paligemma.depth}, expert {self.expert.depth}"
            )
        kv_shape = (self.paligemma.num_kv_heads, self.paligemma.head_dim)
        if kv_shape != (self.expert.num_kv_heads, self.expert.head_dim):
            raise ConfigError(f"KV heads/head_dim differ: paligemma {kv_shape}, expert "
                              f"{(self.expert.num_kv_heads, self.expert.head_dim)}")
        if self.discrete_state_input and not self.pi05:
            raise ConfigError("discrete_state_input exists only for pi0.5 (pi05=True)")
        if self.action_horizon < 1 or self.num_denoise_steps < 1:
            raise ConfigError(f"action_horizon and num_denoise_steps must be ≥ 1, found "
                              f"{self.action_horizon}, {self.num_denoise_steps}")
        if self.num_denoise_steps > MAX_DENOISE_STEPS:
            raise ConfigError(f"num_denoise_steps must be ≤ {MAX_DENOISE_STEPS} (beyond it openpi's float32 Euler "
                              f"time no longer takes that many steps), found {self.num_denoise_steps}")

    def max_prompt_len(self, image_slots: int) -> int:
        """The most prompt tokens that fit Gemma's positions beside `image_slots` images and the
        action tokens."""
        return GEMMA_MAX_POSITIONS - image_slots * self.siglip.tokens_per_image - self.suffix_len

    def check_positions(self) -> None:
        """Image, prompt and action tokens within Gemma's positions. Not a construction check: the
        bench builds graphs of fewer camera slots than the model has (it checks `max_prompt_len` of those)."""
        if self.max_token_len > self.max_prompt_len(self.num_image_slots):
            positions = self.prefix_len + self.suffix_len
            raise ConfigError(f"{self.num_image_tokens} image tokens + max_token_len {self.max_token_len} + "
                              f"{self.suffix_len} action tokens = {positions} positions, more than Gemma's "
                              f"{GEMMA_MAX_POSITIONS}")

    @property
    def num_image_tokens(self) -> int:
        return self.num_image_slots * self.siglip.tokens_per_image

    @property
    def prefix_len(self) -> int:
        return self.num_image_tokens + self.max_token_len

    @property
    def suffix_len(self) -> int:
        # pi0 puts a state token before the action tokens.
        return self.action_horizon + (0 if self.pi05 else 1)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


SO400M = SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, projection_dim=2048)
GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
# openpi's `dummy` Gemma variant and the fixtures' shrunken SigLIP.
GEMMA_DUMMY = GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16)
SIGLIP_SMALL = SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=4, projection_dim=64)

PRESETS: dict[str, ModelConfig] = {
    "pi0": ModelConfig("pi0", pi05=False, siglip=SO400M, paligemma=GEMMA_2B, expert=GEMMA_300M,
                       action_horizon=50, max_token_len=48),
    "pi05": ModelConfig("pi05", pi05=True, siglip=SO400M, paligemma=GEMMA_2B, expert=GEMMA_300M,
                        action_horizon=10, max_token_len=200, discrete_state_input=True),
    "pi05_libero": ModelConfig("pi05_libero", pi05=True, siglip=SO400M, paligemma=GEMMA_2B, expert=GEMMA_300M,
                               action_horizon=10, max_token_len=200, discrete_state_input=False),
    "pi05_droid": ModelConfig("pi05_droid", pi05=True, siglip=SO400M, paligemma=GEMMA_2B, expert=GEMMA_300M,
                              action_horizon=15, max_token_len=200, discrete_state_input=True),
    "pi0_small": ModelConfig("pi0_small", pi05=False, siglip=SIGLIP_SMALL, paligemma=GEMMA_DUMMY,
                             expert=GEMMA_DUMMY, action_horizon=50, max_token_len=48),
    "pi05_small": ModelConfig("pi05_small", pi05=True, siglip=SIGLIP_SMALL, paligemma=GEMMA_DUMMY,
                              expert=GEMMA_DUMMY, action_horizon=10, max_token_len=200),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called exactly `name`; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}") from None


def _gemma_from_metadata(meta: Mapping[str, Any], rms_eps: float, rope_theta: float) -> GemmaConfig:
    return GemmaConfig(width=meta["width"], depth=meta["depth"], mlp_dim=meta["mlp_dim"],
                       num_heads=meta["num_heads"], num_kv_heads=meta["num_kv_heads"],
                       head_dim=meta["head_dim"], rms_norm_eps=rms_eps, rope_theta=rope_theta)


def config_from_fixture_metadata(meta: Mapping[str, Any], name: str = "fixture") -> ModelConfig:
    """Build a config from the `config` metadata of an openpi reference fixture file."""
    pi0 = meta["pi0_config"]
    sig = meta["siglip"]
    for key, want in (("hidden_act", "gelu_pytorch_tanh"),):
        if sig.get(key, want) != want or meta.get("gemma_hidden_activation", want) != want:
            raise ConfigError(f"only {key}={want} is implemented")
    eps = float(meta.get("gemma_rms_norm_eps", 1e-6))
    theta = float(meta.get("gemma_rope_theta", 10000.0))
    return ModelConfig(
        name=name,
        pi05=bool(pi0["pi05"]),
        siglip=SiglipConfig(width=sig["hidden_size"], depth=sig["num_hidden_layers"], mlp_dim=sig["intermediate_size"],
                            num_heads=sig["num_attention_heads"], projection_dim=sig["projection_dim"],
                            patch_size=sig["patch_size"], image_size=sig["image_size"],
                            layer_norm_eps=float(sig["layer_norm_eps"])),
        paligemma=_gemma_from_metadata(meta["paligemma_gemma"], eps, theta),
        expert=_gemma_from_metadata(meta["action_expert_gemma"], eps, theta),
        action_dim=pi0["action_dim"],
        action_horizon=pi0["action_horizon"],
        max_token_len=pi0["max_token_len"],
        num_denoise_steps=int(meta.get("num_denoise_steps", 10)),
        vocab_size=int(meta.get("vocab_size_in_model", PALIGEMMA_VOCAB_SIZE)),
        discrete_state_input=bool(pi0.get("discrete_state_input", False)) and bool(pi0["pi05"]),
    )
