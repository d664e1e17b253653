"""PIL's bilinear resize of uint8 images, bit for bit, in numpy (spec: openpi_pipeline.md, 4), and
the geometry and tap tables that `engine/preprocess.py` runs on the GPU.

openpi_client's `resize_with_pad` calls `PIL.Image.resize(..., resample=Image.BILINEAR)`. That is
not the textbook 2x2 interpolation: PIL convolves with a triangle filter whose support grows with
the downscale factor (so shrinking antialiases), and it works in fixed point. Its algorithm
(Pillow `libImaging/Resample.c`), for one axis of `in_size` pixels resampled to `out_size`:

    scale   = in_size / out_size
    fscale  = max(scale, 1)
    support = 1 * fscale                            (the triangle's half-width, in input pixels)
    for each output pixel i:
        center = (i + 0.5) * scale
        xmin   = max(int(center - support + 0.5), 0)          (int() truncates toward zero)
        xmax   = min(int(center + support + 0.5), in_size)
        w[x]   = tri((x - center + 0.5) / fscale) for x in [xmin, xmax),  tri(t) = max(1 - |t|, 0)
        w     /= sum(w)                                        (summed left to right)
        k[x]   = int(0.5 + w[x] * 2**22)                       (PRECISION_BITS = 22)

For uint8 images PIL resamples the width first, then the height; each pass computes
`(2**21 + sum(pixel * k)) >> 22` in 32-bit integers and clips to 0..255, so the intermediate
image is rounded to uint8. A pass whose size does not change is skipped (its weights would be
the identity anyway). This module reproduces all of it: the coefficients in float64 in PIL's
order of operations, the sums with integer-exact arithmetic, so results equal Pillow's exactly
(checked against pillow 11.3.0 on several hundred sizes, shrinking and enlarging; openpi pins
11.2.1). Pillow 13 takes the height pass first for some frames taller than wide (e.g. 248x100),
where its output differs from this by one level; landscape frames match it too.

Public API:
    PRECISION_BITS
    PadGeometry, pad_geometry(in_hw, out_hw) -> where resize-with-pad puts the image (ValueError if too thin)
    tap_tables(in_size, out_size) -> (rows int64 [ksize, out_size], fixed int32 [ksize, out_size])
    resize_weights(in_size, out_size) -> float64 [out_size, in_size], each row sums to 1
    resize_weights_fixed(in_size, out_size) -> int32 [out_size, in_size], PIL's fixed point
    pil_bilinear_resize(image, out_h, out_w) -> uint8 [out_h, out_w, C] (or [out_h, out_w])

On another device (`engine/preprocess.py`) the same taps run as int32 gathers, products and sums
(`tap_tables`), with 2**21 added, a right shift by 22 (floor) and a clip to 0..255 after *each*
pass. The dense matrices (`resize_weights_fixed`) would do as two matmuls only in arithmetic that is
exact on integers (int32, float64; float32 only with the weights split in two, and never TF32).
Inexact shortcuts are off by at most one uint8 level, on noise 640x480 -> 224x168: the float64
matrices with one rounding at the end (like torch's antialiased bilinear) differ on ~11% of values,
float32 matrices rounded after each pass on ~1%.

How the numpy passes stay exact and fast: a pass gathers, for each of the few tap positions j (3
for an enlargement, 7 for 640 -> 224), the input row `start[i] + j` of every output pixel i, then
sums `k[i, j] * x[start[i] + j]` over j for every i at once (one einsum) in int32; no loop over the
output pixels. The weights of a pixel sum to 2**22 up to rounding (at most ksize / 2 more), so
every partial sum stays below 255 * (2**22 + ksize) + 2**21 < 2**31: exact whatever the order. On
the robot this runs per camera per inference: 640x480 -> 224x168 takes ~3.2 ms on a 2-core CPU
machine, against ~4.7 ms for a take, a multiply and an add per tap, and ~11 ms for the earlier
loop of one small matmul per output pixel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import cv2
import numpy as np

PRECISION_BITS = 22  # PIL: 32 - 8 - 2
_HALF = 1 << (PRECISION_BITS - 1)
_BILINEAR_SUPPORT = 1.0


class _Taps(NamedTuple):
    """Output pixel i reads input pixels starts[i] ... starts[i] + counts[i] - 1.

    weights / fixed: float64 / int32 [out_size, ksize]; column j is input starts[i] + j, zero for
    j >= counts[i]. rows: int64 [ksize, out_size], the input row tap j reads for each output pixel
    (clipped to the image where the tap's weight is zero)."""

    starts: np.ndarray
    counts: np.ndarray
    weights: np.ndarray
    fixed: np.ndarray
    rows: np.ndarray


# A robot's cameras need a few entries (two passes per frame size); each can take ~3.5 MB for the
# widest frame the node takes, so dozens of sizes (a driver, or a sender, changing them) would hold
# hundreds of MB.
@functools.lru_cache(maxsize=16)
def _taps(in_size: int, out_size: int) -> _Taps:
    """PIL's precompute_coeffs and normalize_coeffs_8bpc, for the triangle (bilinear) filter."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _BILINEAR_SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale

    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    starts = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    counts = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - starts

    columns = np.arange(ksize, dtype=np.int64)
    used = columns[None, :] < counts[:, None]
    # PIL: filter((x + xmin - center + 0.5) * ss): the int sum, then double arithmetic in order.
    t = np.abs((((columns[None, :] + starts[:, None]).astype(np.float64) - center[:, None]) + 0.5)
               * inv_filterscale)
    weights = np.where(used & (t < 1.0), 1.0 - t, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):  # left to right, as PIL (numpy's sum may pair terms differently)
        total = total + weights[:, j]
    np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    fixed = np.trunc(0.5 + weights * float(1 << PRECISION_BITS)).astype(np.int32)  # weights >= 0

    rows = np.minimum(starts[None, :] + columns[:, None], in_size - 1)
    taps = _Taps(starts, counts, weights, fixed, rows)
    for array in (starts, counts, weights, fixed, rows):
        array.flags.writeable = False
    return taps


def tap_tables(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass as `ksize` taps: output pixel i adds `fixed[j, i] * x[rows[j, i]]` over j, then
    (sum + 2**21) >> 22, clipped to 0..255. Read-only arrays, cached per size pair."""
    taps = _taps(in_size, out_size)
    fixed_by_tap = np.ascontiguousarray(taps.fixed.T)
    fixed_by_tap.flags.writeable = False
    return taps.rows, fixed_by_tap


class PadGeometry(NamedTuple):
    """resize-with-pad: the image is resized to `new_hw` and pasted at `offset_yx` of a black canvas."""

    new_hw: tuple[int, int]
    offset_yx: tuple[int, int]


def pad_geometry(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> PadGeometry:
    """openpi_client's resize_with_pad: ratio = max(w / W, h / H), new size int(w / ratio) x
    int(h / ratio), pasted at (int((W - w') / 2), int((H - h') / 2)), any odd pixel of padding
    going bottom / right. ValueError when a side becomes 0 pixels."""
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    if (in_h, in_w) == (out_h, out_w):
        return PadGeometry((out_h, out_w), (0, 0))
    ratio = max(in_w / out_w, in_h / out_h)
    new_h, new_w = int(in_h / ratio), int(in_w / ratio)
    if new_h == 0 or new_w == 0:
        raise ValueError(f"image {in_w}x{in_h} is too thin to resize into {out_w}x{out_h} "
                         f"(it becomes {new_w}x{new_h})")
    return PadGeometry((new_h, new_w), (max(0, int((out_h - new_h) / 2)), max(0, int((out_w - new_w) / 2))))


def _dense(in_size: int, out_size: int, band: np.ndarray, dtype: type) -> np.ndarray:
    taps = _taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=dtype)
    for i in range(out_size):
        start, count = taps.starts[i], taps.counts[i]
        matrix[i, start:start + count] = band[i, :count]
    return matrix


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """PIL's normalized bilinear weights, dense float64 [out_size, in_size]: `W @ x` resizes x
    along its first axis. Rows sum to 1 (PIL's fixed-point rounding comes after)."""
    return _dense(in_size, out_size, _taps(in_size, out_size).weights, np.float64)


def resize_weights_fixed(in_size: int, out_size: int) -> np.ndarray:
    """PIL's fixed-point weights, dense int32 [out_size, in_size], `round(w * 2**22)`.

    One exact pass: `clip((K @ x + 2**21) >> 22, 0, 255)` with x uint8 widened to int32."""
    return _dense(in_size, out_size, _taps(in_size, out_size).fixed, np.int32)


# The most bytes of gathered taps a pass holds at once (a 640x480 frame's passes take ~2 MB).
_GATHER_BYTES = 8 << 20


def _resample_rows(x: np.ndarray, out_size: int) -> np.ndarray:
    """One PIL 8-bit pass along axis 0 of uint8 [in_size, M] -> uint8 [out_size, M]."""
    taps = _taps(x.shape[0], out_size)
    acc = np.empty((out_size, x.shape[1]), dtype=np.int32)
    # Every tap's input row of every output pixel, then one einsum over the taps in int32 (exact:
    # see the module docstring): 3x less time than a take, multiply and add per tap (640 -> 224).
    # In column blocks of at most _GATHER_BYTES gathered: a 4K frame's pass gathers ~54 MB at once.
    block = max(1, _GATHER_BYTES // (out_size * taps.fixed.shape[1]))
    for m0 in range(0, x.shape[1], block):
        gathered = np.take(x[:, m0:m0 + block], taps.rows.T, axis=0)  # [out_size, ksize, block] uint8
        np.einsum("okm,ok->om", gathered, taps.fixed, dtype=np.int32, out=acc[:, m0:m0 + block])
    acc += _HALF
    acc >>= PRECISION_BITS  # arithmetic shift: floor, like PIL's clip8
    np.clip(acc, 0, 255, out=acc)
    return acc.astype(np.uint8)


def _transpose_hw(image: np.ndarray) -> np.ndarray:
    """[A, B, C] -> contiguous [B, A, C]."""
    if image.shape[2] <= 4:
        return cv2.transpose(image).reshape(image.shape[1], image.shape[0], image.shape[2])
    return np.ascontiguousarray(image.transpose(1, 0, 2))


def pil_bilinear_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """`np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR))`, without PIL.

    image: uint8 [H, W, C] or [H, W]. Returns a new uint8 array of shape [out_h, out_w(, C)].
    Channels are resampled independently, as PIL does for "L" and "RGB" images (for "RGBA" PIL
    premultiplies by alpha first, which this does not)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 image [H, W] or [H, W, C], found "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    if min(out_h, out_w, *image.shape) <= 0:
        raise ValueError(f"sizes must be positive, got {image.shape} -> {out_h}x{out_w}")
    pixels = image if image.ndim == 3 else image[:, :, None]
    height, width, channels = pixels.shape
    if (height, width) == (out_h, out_w):
        return image.copy()
    if width != out_w:  # width first, as PIL
        columns = _transpose_hw(pixels).reshape(width, height * channels)
        pixels = _transpose_hw(_resample_rows(columns, out_w).reshape(out_w, height, channels))
    if height != out_h:
        pixels = _resample_rows(np.ascontiguousarray(pixels).reshape(height, out_w * channels), out_h)
    return pixels.reshape((out_h, out_w) + image.shape[2:])
