"""What the engine is built for (`EngineShape`) and what one inference consumes (`EngineBatch`).

Every CUDA graph and static buffer is sized from one frozen `EngineShape`; a batch of any other
shape is rejected with expected vs found, never silently re-captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pi0_policy_ros.errors import ConfigError, ObservationError
from pi0_policy_ros.model.config import ModelConfig

PRECISIONS = ("bfloat16", "float32", "fp8")
# The prefix is padded with masked rows up to a multiple of this: FP8 `_scaled_mm` wants
# 16-aligned dims, and GEMM tiles like it. Masked rows change no valid output (their keys get
# the mask value, whose exp underflows to exactly 0).
PREFIX_ALIGN = 16


@dataclass(frozen=True)
class EngineShape:
    """Fixed geometry of one engine: batch 1, `num_slots` cameras of `image_hw` uint8 pixels."""

    num_slots: int
    image_hw: tuple[int, int]
    prompt_len: int
    action_horizon: int
    action_dim: int
    num_steps: int
    pi05: bool
    tokens_per_image: int = 256
    model_image_size: int = 224

    def __post_init__(self) -> None:
        for name in ("num_slots", "prompt_len", "action_horizon", "action_dim", "num_steps", "tokens_per_image"):
            if getattr(self, name) < 1:
                raise ConfigError(f"EngineShape.{name} must be ≥ 1, found {getattr(self, name)}")
        if len(self.image_hw) != 2 or min(self.image_hw) < 1:
            raise ConfigError(f"EngineShape.image_hw must be (height, width) ≥ 1, found {self.image_hw}")

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_slots: int | None = None, prompt_len: int | None = None,
                  image_hw: tuple[int, int] | None = None) -> EngineShape:
        size = cfg.siglip.image_size
        return cls(num_slots=cfg.num_image_slots if num_slots is None else num_slots,
                   image_hw=(size, size) if image_hw is None else tuple(image_hw),
                   prompt_len=cfg.max_token_len if prompt_len is None else prompt_len,
                   action_horizon=cfg.action_horizon, action_dim=cfg.action_dim,
                   num_steps=cfg.num_denoise_steps, pi05=cfg.pi05,
                   tokens_per_image=cfg.siglip.tokens_per_image, model_image_size=size)

    def check_model(self, cfg: ModelConfig) -> None:
        found = (cfg.action_horizon, cfg.action_dim, cfg.num_denoise_steps, cfg.pi05,
                 cfg.siglip.tokens_per_image, cfg.siglip.image_size)
        want = (self.action_horizon, self.action_dim, self.num_steps, self.pi05, self.tokens_per_image,
                self.model_image_size)
        if found != want:
            raise ConfigError(f"model {cfg.name!r} does not fit this EngineShape: (horizon, action_dim, steps, pi05, "
                              f"tokens/image, image size) expected {want}, found {found}")

    @property
    def num_image_tokens(self) -> int:
        return self.num_slots * self.tokens_per_image

    @property
    def prefix_len(self) -> int:
        """Valid-or-masked prefix rows as the model sees them (images, then the prompt)."""
        return self.num_image_tokens + self.prompt_len

    @property
    def padded_prefix_len(self) -> int:
        return -(-self.prefix_len // PREFIX_ALIGN) * PREFIX_ALIGN

    @property
    def suffix_len(self) -> int:
        return self.action_horizon + (0 if self.pi05 else 1)

    def prompt_buckets(self) -> list[int]:
        """Prompt rows an inference may compute: 16, 32, 64, … below `prompt_len`, then it."""
        buckets, p = [], 16
        while p < self.prompt_len:
            buckets.append(p)
            p *= 2
        return [*buckets, self.prompt_len]

    def prefix_buckets(self) -> list[PrefixRows]:
        """Every (camera slots, prompt rows) pair the engine captures a vision / prefix graph for."""
        return [PrefixRows(n, p, lead) for n in range(1, self.num_slots + 1) for p in self.prompt_buckets()
                for lead in (True, False)]

    @property
    def full_prefix(self) -> PrefixRows:
        return PrefixRows(self.num_slots, self.prompt_len)


@dataclass(frozen=True)
class PrefixRows:
    """The part of the prefix one inference computes: the first `slots` camera slots (the valid
    ones, moved to the front on the host) and the first `prompt` prompt tokens, padded with masked
    rows to `PREFIX_ALIGN`. Rows past it are masked, so leaving them out changes no valid output:
    masked tokens are no one's keys, do not advance the RoPE positions (a cumulative sum of the
    mask), and their own outputs are never read; their stale K/V rows stay masked for the denoise
    steps. Valid tokens keep their order, hence their positions.
    leading_keys: the valid tokens are exactly the first ones (valid slots, then a prompt whose
    valid tokens come first), so attention can stop at their count instead of masking keys."""

    slots: int
    prompt: int
    leading_keys: bool = False

    def rows(self, tokens_per_image: int) -> int:
        return -(-(self.slots * tokens_per_image + self.prompt) // PREFIX_ALIGN) * PREFIX_ALIGN


_TORCH_DTYPES = {"uint8": torch.uint8, "bool": torch.bool, "int64": torch.int64, "float32": torch.float32}


@dataclass
class EngineBatch:
    """One observation, already tokenized and normalized (batch 1).

    images: uint8 [num_slots, H, W, 3] (RGB, HWC); image_masks: bool [num_slots].
    tokens: int64 [L]; token_mask: bool [L]. state: float32 [action_dim] (pi0 only).
    noise: float32 [H, action_dim], x at t = 1.
    """

    images: np.ndarray | torch.Tensor
    image_masks: np.ndarray | torch.Tensor
    tokens: np.ndarray | torch.Tensor
    token_mask: np.ndarray | torch.Tensor
    state: np.ndarray | torch.Tensor
    noise: np.ndarray | torch.Tensor

    def check(self, shape: EngineShape) -> None:
        h, w = shape.image_hw
        want = {
            "images": ((shape.num_slots, h, w, 3), "uint8"),
            "image_masks": ((shape.num_slots,), "bool"),
            "tokens": ((shape.prompt_len,), "int64"),
            "token_mask": ((shape.prompt_len,), "bool"),
            "state": ((shape.action_dim,), "float32"),
            "noise": ((shape.action_horizon, shape.action_dim), "float32"),
        }
        problems = []
        for name, (dims, dtype) in want.items():
            value = getattr(self, name)
            if not isinstance(value, (np.ndarray, torch.Tensor)):  # a list or None has no dtype to compare
                problems.append(f"{name}: expected {dtype} {list(dims)}, found {type(value).__name__}")
                continue
            # numpy dtypes compare equal to their names without building strings (the hot path)
            same_dtype = value.dtype == dtype if isinstance(value, np.ndarray) else value.dtype == _TORCH_DTYPES[dtype]
            if value.shape != dims or not same_dtype:
                found_dtype = str(value.dtype).removeprefix("torch.")
                problems.append(f"{name}: expected {dtype} {list(dims)}, found {found_dtype} {list(value.shape)}")
        if problems:
            raise ObservationError("EngineBatch does not match the engine shape: " + "; ".join(problems))


def random_batch(shape: EngineShape, seed: int = 0, valid_slots: int | None = None,
                 valid_tokens: int | None = None) -> EngineBatch:
    """A random, valid batch (benchmarks and tests): the first `valid_slots` cameras and the first
    `valid_tokens` prompt tokens are valid."""
    rng = np.random.default_rng(seed)
    h, w = shape.image_hw
    n_slots = shape.num_slots if valid_slots is None else valid_slots
    n_tok = min(shape.prompt_len, 24) if valid_tokens is None else valid_tokens
    tokens = np.zeros(shape.prompt_len, np.int64)
    tokens[:n_tok] = rng.integers(3, 1024, n_tok)
    tokens[0] = 2
    return EngineBatch(
        images=rng.integers(0, 256, (shape.num_slots, h, w, 3), dtype=np.uint8),
        image_masks=np.arange(shape.num_slots) < n_slots,
        tokens=tokens,
        token_mask=np.arange(shape.prompt_len) < n_tok,
        state=rng.standard_normal(shape.action_dim).astype(np.float32),
        noise=rng.standard_normal((shape.action_horizon, shape.action_dim)).astype(np.float32),
    )


def plan_prefix(shape: EngineShape, image_masks: np.ndarray | torch.Tensor, token_mask: np.ndarray | torch.Tensor,
                compact: bool = True) -> tuple[PrefixRows, list[int]]:
    """What one inference computes and in which order the camera slots go in: (rows, slot order).
    compact: the valid slots first (each group in slot order), and the smallest prompt bucket that
    holds the valid tokens when those are the prompt's first tokens (else the whole prompt).
    Otherwise the full prefix in slot order (never `leading_keys`)."""
    n = shape.num_slots
    if not compact:
        return shape.full_prefix, list(range(n))
    masks = np.asarray(image_masks.cpu() if isinstance(image_masks, torch.Tensor) else image_masks, dtype=bool)
    tokens = np.asarray(token_mask.cpu() if isinstance(token_mask, torch.Tensor) else token_mask, dtype=bool)
    order = [i for i in range(n) if masks[i]] + [i for i in range(n) if not masks[i]]
    valid = int(tokens.sum())
    leading = bool(tokens[:valid].all())  # the valid tokens are exactly the first `valid`
    prompt = next(b for b in shape.prompt_buckets() if b >= valid) if leading else shape.prompt_len
    return PrefixRows(max(1, int(masks.sum())), prompt, leading_keys=leading and bool(masks.any())), order


class PrefixPlanner:
    """`plan_prefix` for one engine, remembered per pair of numpy masks. The masks change only when
    a camera or the prompt does, and the plan runs before the GPU can start: after each ~10 ms wait
    for the previous inference it took 105 us on the H100 against 18.5 for the lookup (attempt 59).
    At most `capacity` plans are kept (a prompt's token mask is one key; holes in it make others)."""

    def __init__(self, shape: EngineShape, compact: bool, capacity: int = 64) -> None:
        self.shape, self.compact, self.capacity = shape, compact, capacity
        self._plans: dict[tuple[bytes, bytes], tuple[PrefixRows, list[int]]] = {}

    def __call__(self, image_masks: np.ndarray | torch.Tensor,
                 token_mask: np.ndarray | torch.Tensor) -> tuple[PrefixRows, list[int]]:
        """As `plan_prefix`; the slot order returned may be shared between calls: read it only."""
        if not (isinstance(image_masks, np.ndarray) and isinstance(token_mask, np.ndarray)):
            return plan_prefix(self.shape, image_masks, token_mask, self.compact)
        key = (image_masks.tobytes(), token_mask.tobytes())
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.capacity:
                self._plans.clear()
            plan = self._plans[key] = plan_prefix(self.shape, image_masks, token_mask, self.compact)
        return plan

    def __len__(self) -> int:
        """How many plans are kept now."""
        return len(self._plans)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"engine precision must be one of {PRECISIONS}, found {precision!r}")
    return precision


# Oldest compute capability with the tensor-core formats each precision runs on: bf16 since Ampere
# (sm_80; Jetson Orin is sm_87), FP8 e4m3 (`torch._scaled_mm`) since Ada (sm_89) and Hopper.
MIN_CAPABILITY = {"bfloat16": (8, 0), "fp8": (8, 9), "float32": (0, 0)}


def check_precision_on_gpu(precision: str, capability: tuple[int, int], gpu_name: str) -> None:
    """A precision this GPU cannot run is refused at configure, naming what it needs, instead of
    failing inside the first inference."""
    need = MIN_CAPABILITY[check_precision(precision)]
    if tuple(capability) < need:
        fallback = "bfloat16" if tuple(capability) >= MIN_CAPABILITY["bfloat16"] else "float32"
        raise ConfigError(f"precision {precision!r} needs a GPU of compute capability {need[0]}.{need[1]} or "
                          f"newer; {gpu_name} is {capability[0]}.{capability[1]}: use precision {fallback!r}")


def hopper_or_newer(device: torch.device) -> bool:
    """A CUDA GPU of compute capability 9.0 or newer: TMA, wgmma and programmatic dependent launch."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
