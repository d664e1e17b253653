"""Static buffers: allocated once per engine, written in place by every inference.

The graphs capture these tensors' addresses, so they must never be reallocated or resized.
Host-side inputs and the output live in pinned memory (CUDA only) so that the copies are truly
asynchronous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pi0_policy_ros.engine.types import EngineBatch, EngineShape
from pi0_policy_ros.model.config import GemmaConfig

# The inputs in one slab of bytes, laid out the same on the host and on the device, so that one copy
# moves a whole batch (on the H100 machines six copies spanned 0.06-0.18 ms of the GPU's timeline,
# one spans 0.03-0.04: notes attempt 31).
SLAB_ALIGN = 256  # bytes; any dtype's view may start at an offset that is a multiple of this
INPUT_NAMES = ("images", "image_masks", "tokens", "token_mask", "state", "noise")  # HostBuffers' batch fields


@dataclass(frozen=True)
class SlabLayout:
    """Where each input lives in the slab: name → (byte offset, shape, dtype), in slab order."""
    fields: dict[str, tuple[int, tuple[int, ...], torch.dtype]]

    @classmethod
    def for_shape(cls, shape: EngineShape) -> SlabLayout:
        h, w = shape.image_hw
        # In slab order. x (the noise, then every step's output) comes along whole: each step writes
        # its x before the next step reads it, so the host bytes it carries there (14-70 KB) are
        # never read. The images go last: a copy that ends after the first `slots` images leaves
        # the slots vision skips behind.
        dims = {
            "image_masks": ((shape.num_slots,), torch.bool),
            "tokens": ((shape.prompt_len,), torch.int64),
            "token_mask": ((shape.prompt_len,), torch.bool),
            "state": ((shape.action_dim,), torch.float32),
            "x": ((shape.num_steps + 1, shape.action_horizon, shape.action_dim), torch.float32),
            "images": ((shape.num_slots, h, w, 3), torch.uint8),
        }
        fields, offset = {}, 0
        for name, (size, dtype) in dims.items():
            fields[name] = (offset, size, dtype)
            offset += -(-_nbytes(size, dtype) // SLAB_ALIGN) * SLAB_ALIGN
        return cls(fields)

    def copied_bytes(self, slots: int | None = None) -> int:
        """The slab's first bytes that one upload moves: everything up to the `slots`-th image
        (default: every slot's, i.e. the whole slab)."""
        offset, size, dtype = self.fields["images"]
        return offset + _nbytes(size[1:], dtype) * (size[0] if slots is None else slots)

    @property
    def nbytes(self) -> int:
        return self.copied_bytes()

    def allocate(self, device: torch.device, pin: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The zeroed slab and a typed view of it per input."""
        slab = torch.zeros(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
        views = {name: slab[offset:offset + _nbytes(size, dtype)].view(dtype).view(size)
                 for name, (offset, size, dtype) in self.fields.items()}
        return slab, views


def _nbytes(size: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(np.prod(size)) * dtype.itemsize


@dataclass
class HostBuffers:
    images: torch.Tensor  # uint8 [N, H, W, 3]
    image_masks: torch.Tensor  # bool [N]
    tokens: torch.Tensor  # int64 [L]
    token_mask: torch.Tensor  # bool [L]
    state: torch.Tensor  # float32 [A]
    noise: torch.Tensor  # float32 [H, A]: the slab's x[0]
    actions: torch.Tensor  # float32 [H, A]
    slab: torch.Tensor  # uint8: every input above but `actions` is a view of it
    layout: SlabLayout
    # numpy views of the inputs, made once: `load` runs cold after every wait for the GPU, where each
    # `Tensor.numpy()` it called cost more than the copy it served (attempt 59)
    arrays: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.arrays = {name: getattr(self, name).numpy() for name in INPUT_NAMES}

    def load(self, batch: EngineBatch, slot_order: list[int] | None = None, slots: int | None = None) -> None:
        """Copy one batch into the (pinned) host buffers: plain CPU memcpy, no device work.
        `slot_order`: host slot i takes the batch's camera slot `slot_order[i]` (with its mask).
        `slots`: only the first that many images are copied (the ones vision computes); every mask is.
        numpy inputs are copied by numpy, on this thread: torch's CPU `copy_` of the images would
        use its intra-op thread pool, whose wake-up is a latency risk in the control loop."""
        order = range(len(self.images)) if slot_order is None else slot_order
        for name in ("images", "image_masks"):
            value = getattr(batch, name)
            order_here = order[:slots] if name == "images" else order
            if isinstance(value, torch.Tensor):
                dst = getattr(self, name)
                for i, slot in enumerate(order_here):
                    dst[i].copy_(value[slot])
            else:
                dst_np = self.arrays[name]
                for i, slot in enumerate(order_here):
                    dst_np[i] = value[slot]
        for name in ("tokens", "token_mask", "state", "noise"):
            value = getattr(batch, name)
            if isinstance(value, torch.Tensor):
                getattr(self, name).copy_(value)
            else:
                np.copyto(self.arrays[name], value, casting="no")


@dataclass
class DeviceBuffers:
    # inputs: views of `slab`, laid out as the host's
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
    slab: torch.Tensor  # uint8, `SlabLayout`

    @property
    def actions(self) -> torch.Tensor:
        return self.x[-1]


def allocate_host(shape: EngineShape, pin: bool) -> HostBuffers:
    layout = SlabLayout.for_shape(shape)
    slab, views = layout.allocate(torch.device("cpu"), pin)
    actions = torch.zeros((shape.action_horizon, shape.action_dim), dtype=torch.float32, pin_memory=pin)
    return HostBuffers(images=views["images"], image_masks=views["image_masks"], tokens=views["tokens"],
                       token_mask=views["token_mask"], state=views["state"], noise=views["x"][0], actions=actions,
                       slab=slab, layout=layout)


def allocate_device(shape: EngineShape, lm: GemmaConfig, expert_width: int, dtype: torch.dtype,
                    device: torch.device) -> DeviceBuffers:
    from pi0_policy_ros.engine.tables import rope_inv_freq, suffix_pattern

    pp, s, hd = shape.padded_prefix_len, shape.suffix_len, lm.head_dim
    size = shape.model_image_size

    def zeros(*dims: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(dims, dtype=dt, device=device)

    slab, inputs = SlabLayout.for_shape(shape).allocate(device)
    return DeviceBuffers(
        **inputs,
        slab=slab,
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
    """Host → device in one non-blocking copy from pinned memory: every input, and only the first
    `slots` images (default all)."""
    n = host.layout.copied_bytes(slots)
    dev.slab[:n].copy_(host.slab[:n], non_blocking=True)
