"""Static buffers: allocated once per engine, written in place by every inference.

The graphs capture these tensors' addresses, so they must never be reallocated or resized.
Host-side inputs and the output live in pinned memory (CUDA only) so that the copies are truly
asynchronous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pi0_policy_ros.engine.types import EngineBatch, EngineShape
from pi0_policy_ros.model.config import GemmaConfig


@dataclass
class HostBuffers:
    images: torch.Tensor  # uint8 [N, H, W, 3]
    image_masks: torch.Tensor  # bool [N]
    tokens: torch.Tensor  # int64 [L]
    token_mask: torch.Tensor  # bool [L]
    state: torch.Tensor  # float32 [A]
    noise: torch.Tensor  # float32 [H, A]
    actions: torch.Tensor  # float32 [H, A]

    def load(self, batch: EngineBatch, slot_order: list[int] | None = None, slots: int | None = None) -> None:
        """Copy one batch into the (pinned) host buffers: plain CPU memcpy, no device work.
        `slot_order`: host slot i takes the batch's camera slot `slot_order[i]` (with its mask).
        `slots`: only the first that many images are copied (the ones vision computes); every mask is.
        numpy inputs are copied by numpy, on this thread: torch's CPU `copy_` of the images would
        use its intra-op thread pool, whose wake-up is a latency risk in the control loop."""
        order = list(range(len(self.images)) if slot_order is None else slot_order)
        for name in ("images", "image_masks"):
            value, dst = getattr(batch, name), getattr(self, name)
            order_here = order[:slots] if name == "images" else order
            if isinstance(value, torch.Tensor):
                for i, slot in enumerate(order_here):
                    dst[i].copy_(value[slot])
            else:
                dst_np = dst.numpy()
                for i, slot in enumerate(order_here):
                    dst_np[i] = value[slot]
        for name in ("tokens", "token_mask", "state", "noise"):
            value = getattr(batch, name)
            if isinstance(value, torch.Tensor):
                getattr(self, name).copy_(value)
            else:
                np.copyto(getattr(self, name).numpy(), value, casting="no")


@dataclass
class DeviceBuffers:
    # inputs
    images: torch.Tensor  # uint8 [N, H, W, 3]
    image_masks: torch.Tensor  # bool [N]
    tokens: torch.Tensor  # int64 [L]
    token_mask: torch.Tensor  # bool [L]
    state: torch.Tensor  # float32 [A]
    x: torch.Tensor  # float32 [steps + 1, H, A]: x[0] is the noise, step k writes x[k + 1]
    # vision → prefix
    pixels: torch.Tensor  # float32 [N, 3, S, S]
    prefix_embs: torch.Tensor  # [Pp, D] compute dtype; rows [0, N·T) are the image tokens
    prefix_pad: torch.Tensor  # bool [Pp]; rows ≥ P stay False
    prefix_bias: torch.Tensor  # [1, 1, 1, Pp] compute dtype, additive key mask of the prefix
    prefix_seq_ends: torch.Tensor  # int32 [2, 2]: [0, query rows], [0, valid keys] (flash varlen's cu_seqlens)
    prefix_cos: torch.Tensor  # [Pp, hd]
    prefix_sin: torch.Tensor
    # prefix → denoise
    keys: torch.Tensor  # [layers, Pp + S, hd]; rows [Pp, Pp + S) are rewritten by every step
    values: torch.Tensor
    suffix_bias: torch.Tensor  # float32 [S, Pp + S]
    suffix_cos: torch.Tensor  # [S, hd]
    suffix_sin: torch.Tensor
    state_token: torch.Tensor  # float32 [D_expert] (pi0: state_proj(state); unused for pi0.5)
    # constants
    suffix_pattern: torch.Tensor  # bool [S, S]
    suffix_offsets: torch.Tensor  # int64 [S]
    inv_freq: torch.Tensor  # float32 [hd / 2]

    @property
    def actions(self) -> torch.Tensor:
        return self.x[-1]


def allocate_host(shape: EngineShape, pin: bool) -> HostBuffers:
    h, w = shape.image_hw

    def make(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(size, dtype=dtype, pin_memory=pin)

    return HostBuffers(
        images=make((shape.num_slots, h, w, 3), torch.uint8),
        image_masks=make((shape.num_slots,), torch.bool),
        tokens=make((shape.prompt_len,), torch.int64),
        token_mask=make((shape.prompt_len,), torch.bool),
        state=make((shape.action_dim,), torch.float32),
        noise=make((shape.action_horizon, shape.action_dim), torch.float32),
        actions=make((shape.action_horizon, shape.action_dim), torch.float32),
    )


def allocate_device(shape: EngineShape, lm: GemmaConfig, expert_width: int, dtype: torch.dtype,
                    device: torch.device) -> DeviceBuffers:
    from pi0_policy_ros.engine.tables import rope_inv_freq, suffix_pattern

    h, w = shape.image_hw
    pp, s, hd = shape.padded_prefix_len, shape.suffix_len, lm.head_dim
    size = shape.model_image_size

    def zeros(*dims: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(dims, dtype=dt, device=device)

    return DeviceBuffers(
        images=zeros(shape.num_slots, h, w, 3, dt=torch.uint8),
        image_masks=zeros(shape.num_slots, dt=torch.bool),
        tokens=zeros(shape.prompt_len, dt=torch.int64),
        token_mask=zeros(shape.prompt_len, dt=torch.bool),
        state=zeros(shape.action_dim, dt=torch.float32),
        x=zeros(shape.num_steps + 1, shape.action_horizon, shape.action_dim, dt=torch.float32),
        pixels=zeros(shape.num_slots, 3, size, size, dt=torch.float32),
        prefix_embs=zeros(pp, lm.width),
        prefix_pad=zeros(pp, dt=torch.bool),
        prefix_bias=zeros(1, 1, 1, pp),
        prefix_seq_ends=zeros(2, 2, dt=torch.int32),
        prefix_cos=zeros(pp, hd),
        prefix_sin=zeros(pp, hd),
        keys=zeros(lm.depth, pp + s, hd),
        values=zeros(lm.depth, pp + s, hd),
        suffix_bias=zeros(s, pp + s, dt=torch.float32),
        suffix_cos=zeros(s, hd),
        suffix_sin=zeros(s, hd),
        state_token=zeros(expert_width, dt=torch.float32),
        suffix_pattern=suffix_pattern(s, shape.action_horizon, device),
        suffix_offsets=torch.arange(s, dtype=torch.int64, device=device),
        inv_freq=rope_inv_freq(hd, lm.rope_theta, device),
    )


def upload(host: HostBuffers, dev: DeviceBuffers, slots: int | None = None) -> None:
    """Host → device, non-blocking from pinned memory; only the first `slots` images (default all)."""
    dev.images[:slots].copy_(host.images[:slots], non_blocking=True)
    dev.image_masks.copy_(host.image_masks, non_blocking=True)
    dev.tokens.copy_(host.tokens, non_blocking=True)
    dev.token_mask.copy_(host.token_mask, non_blocking=True)
    dev.state.copy_(host.state, non_blocking=True)
    dev.x[0].copy_(host.noise, non_blocking=True)
