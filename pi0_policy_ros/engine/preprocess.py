"""Image preprocessing on whatever device the images are on: uint8 HWC → resize-with-pad → [-1, 1].

openpi_client's `resize_with_pad` (spec: shared/spec/openpi_pipeline.md §4), pixel for pixel: the
policy's numpy path (`policy.robots.resize_with_pad`) and this one give the same uint8 canvas, so the
network sees the same pixels wherever the resize runs. PIL's bilinear filter runs as two passes of
a few taps each (`resize.tap_tables`: width first, then height; 7 taps for 640 → 224), each an
int32 gather, multiply and sum, then `(sum + 2**21) >> 22` clipped to 0..255, all exact on
integers. On the GPU that puts the resize inside the vision graph: the host copies the camera
frames as they came, instead of resizing them on the CPU first (~2 ms a 640x480 camera).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.resize import PRECISION_BITS, pad_geometry, tap_tables

_HALF = 1 << (PRECISION_BITS - 1)


@dataclass(frozen=True)
class ResizePlan:
    """Where a source image lands in the model's square canvas. Fixed per engine shape."""

    src_hw: tuple[int, int]
    size: int
    dst_hw: tuple[int, int]
    offset_yx: tuple[int, int]

    @property
    def identity(self) -> bool:
        return self.src_hw == (self.size, self.size)


def plan_resize(src_hw: tuple[int, int], size: int) -> ResizePlan:
    try:
        new_hw, offset_yx = pad_geometry(src_hw, (size, size))
    except ValueError as exc:
        raise ConfigError(f"camera images of {src_hw[0]}x{src_hw[1]} (HxW): {exc}") from None
    return ResizePlan(tuple(src_hw), size, new_hw, offset_yx)


@dataclass(frozen=True)
class _AxisPass:
    """One PIL pass along `dim` of int32 [N, H, W, C]: rows int64 [taps · out] (tap-major), fixed
    int32 shaped to broadcast over the gathered [.., taps, out, ..] view."""

    dim: int
    out_size: int
    rows: torch.Tensor
    fixed: torch.Tensor

    @classmethod
    def build(cls, dim: int, in_size: int, out_size: int, device: torch.device) -> _AxisPass:
        rows, fixed = tap_tables(in_size, out_size)
        trailing = (1,) * (3 - dim)  # the dims after `dim` in [N, H, W, C]
        return cls(dim, out_size, torch.tensor(rows.reshape(-1), device=device),
                   torch.tensor(fixed, device=device).view(fixed.shape + trailing))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gathered = x.index_select(self.dim, self.rows)
        taps = self.fixed.shape[0]
        gathered = gathered.view(x.shape[:self.dim] + (taps, self.out_size) + x.shape[self.dim + 1:])
        # Every product and partial sum stays below 2**31 (pixel ≤ 255, weights of a pixel sum to ~2**22).
        acc = gathered.mul_(self.fixed).sum(dim=self.dim, dtype=torch.int32)
        acc.add_(_HALF).bitwise_right_shift_(PRECISION_BITS)
        return acc.clamp_(0, 255)


class ImagePreprocessor:
    """uint8 [N, H, W, 3] → float32 [N, 3, S, S] in [-1, 1] for one `ResizePlan`, its tap tables on
    `device` (built once, so it runs inside a CUDA graph: gathers, products and sums, no host work)."""

    def __init__(self, plan: ResizePlan, device: torch.device | str) -> None:
        self.plan = plan
        device = torch.device(device)
        (src_h, src_w), (dst_h, dst_w) = plan.src_hw, plan.dst_hw
        # PIL resamples the width first, and skips a pass whose size does not change.
        self._passes = [_AxisPass.build(dim, n_in, n_out, device)
                        for dim, n_in, n_out in ((2, src_w, dst_w), (1, src_h, dst_h)) if n_in != n_out]

    def __call__(self, images_u8: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.plan
        n = images_u8.shape[0]
        if out is None:
            out = torch.empty(n, 3, plan.size, plan.size, dtype=torch.float32, device=images_u8.device)
        if plan.identity:
            torch.div(images_u8.permute(0, 3, 1, 2).float(), 255.0, out=out)  # x / 255 * 2 - 1, openpi's order
            return out.mul_(2.0).sub_(1.0)
        resized = images_u8.to(torch.int32)
        for axis_pass in self._passes:
            resized = axis_pass(resized)
        out.fill_(-1.0)  # the black canvas: 0 → -1
        y, x = plan.offset_yx
        dst = out[:, :, y:y + plan.dst_hw[0], x:x + plan.dst_hw[1]]
        dst.copy_(resized.permute(0, 3, 1, 2))
        dst.div_(255.0).mul_(2.0).sub_(1.0)
        return out


@functools.lru_cache(maxsize=16)
def _preprocessor(plan: ResizePlan, device: torch.device) -> ImagePreprocessor:
    return ImagePreprocessor(plan, device)


def preprocess_images(images_u8: torch.Tensor, plan: ResizePlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """`ImagePreprocessor` for call sites without one (the eager path); its tables are built once
    per plan and device, not copied to the device on every call."""
    return _preprocessor(plan, images_u8.device)(images_u8, out)
