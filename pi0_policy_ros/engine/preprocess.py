"""Image preprocessing on whatever device the images are on: uint8 HWC → resize-with-pad → [-1, 1].

openpi_client's `resize_with_pad` (spec: shared/spec/openpi_pipeline.md §4): images already at the
model size pass unchanged; otherwise scale by `ratio = max(w / S, h / S)` to
`int(w / ratio) × int(h / ratio)` with bilinear interpolation, round back to uint8, and paste
centred on a black canvas at `(int((S - w') / 2), int((S - h') / 2))`. openpi uses PIL's bilinear
filter, which widens its support when downscaling; `antialias=True` does the same here, so
pixels agree to about one uint8 level, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    h, w = src_hw
    if (h, w) == (size, size):
        return ResizePlan((h, w), size, (h, w), (0, 0))
    ratio = max(w / size, h / size)
    new_h, new_w = int(h / ratio), int(w / ratio)
    return ResizePlan((h, w), size, (new_h, new_w), (int((size - new_h) / 2), int((size - new_w) / 2)))


def preprocess_images(images_u8: torch.Tensor, plan: ResizePlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float32 [N, 3, S, S] in [-1, 1], written into `out` when given.

    Allocation-free apart from torch's temporaries, so it can run inside a CUDA graph."""
    n = images_u8.shape[0]
    chw = images_u8.permute(0, 3, 1, 2).float()  # [N, 3, H, W], values 0..255
    if out is None:
        out = torch.empty(n, 3, plan.size, plan.size, dtype=torch.float32, device=images_u8.device)
    if plan.identity:
        torch.div(chw, 255.0, out=out)  # x / 255 * 2 - 1, in openpi's order
        out.mul_(2.0).sub_(1.0)
        return out
    resized = F.interpolate(chw, size=plan.dst_hw, mode="bilinear", align_corners=False, antialias=True)
    resized = resized.round_().clamp_(0.0, 255.0)  # PIL returns uint8
    out.fill_(-1.0)  # black canvas: 0 → -1
    y, x = plan.offset_yx
    dst = out[:, :, y:y + plan.dst_hw[0], x:x + plan.dst_hw[1]]
    torch.div(resized, 255.0, out=dst)
    dst.mul_(2.0).sub_(1.0)
    return out
