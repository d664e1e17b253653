"""PIL-exact bilinear resize (spec section 4), checked without PIL.

The golden arrays below were produced by pillow 11.3.0, `Image.fromarray(img).resize((w, h),
Image.BILINEAR)`, on the deterministic 7x13 image of `_pattern()`; pil_bilinear_resize matched
Pillow exactly on several hundred other sizes as well (shrinking and enlarging, up to 1920x1080).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pi0_policy_ros import resize
from pi0_policy_ros.policy.robots import resize_with_pad
from pi0_policy_ros.resize import (
    PRECISION_BITS,
    pil_bilinear_resize,
    resize_weights,
    resize_weights_fixed,
)


def _pattern() -> np.ndarray:
    """uint8 [7, 13, 3]: an arithmetic pattern rough enough to look like noise."""
    y, x, c = np.meshgrid(np.arange(7), np.arange(13), np.arange(3), indexing="ij")
    return ((37 * x + 91 * y + 53 * c + 17 * x * y) % 256).astype(np.uint8)


# PIL's output for _pattern() -> width 5, height 3, channels first.
PIL_5x3 = [
    [[117, 140, 135, 90, 150], [132, 116, 123, 120, 133], [125, 118, 133, 94, 99]],
    [[140, 138, 119, 109, 170], [136, 142, 131, 116, 115], [156, 156, 123, 131, 130]],
    [[151, 157, 98, 146, 93], [130, 129, 127, 135, 138], [104, 104, 112, 135, 155]],
]
# PIL's output for _pattern() -> width 20, height 11, channel 0.
PIL_20x11_C0 = [
    [0, 18, 42, 66, 90, 114, 138, 162, 186, 210, 151, 8, 26, 50, 74, 98, 122, 146, 170, 188],
    [41, 63, 92, 121, 150, 170, 124, 121, 150, 179, 163, 101, 54, 39, 68, 97, 126, 155, 184, 206],
    [99, 126, 159, 180, 211, 229, 115, 77, 99, 135, 172, 208, 98, 41, 62, 96, 132, 168, 192, 207],
    [157, 189, 209, 131, 132, 170, 167, 122, 49, 92, 135, 178, 177, 143, 65, 95, 138, 181, 126, 69],
    [122, 159, 189, 133, 107, 103, 153, 143, 89, 78, 98, 148, 198, 178, 62, 93, 143, 193, 109, 24],
    [17, 59, 116, 173, 122, 32, 89, 146, 197, 88, 62, 119, 176, 163, 54, 92, 149, 206, 129, 49],
    [75, 122, 166, 124, 112, 111, 69, 88, 151, 154, 135, 94, 154, 147, 45, 90, 155, 219, 149, 74],
    [133, 152, 163, 113, 113, 130, 81, 74, 102, 173, 161, 66, 131, 131, 36, 88, 145, 170, 135, 99],
    [191, 137, 90, 154, 128, 71, 133, 119, 51, 129, 124, 36, 108, 116, 28, 87, 113, 41, 77, 123],
    [109, 116, 123, 117, 122, 130, 124, 128, 137, 131, 133, 143, 138, 101, 20, 86, 114, 33, 86, 148],
    [34, 100, 158, 82, 115, 186, 110, 130, 214, 138, 145, 236, 166, 90, 14, 85, 118, 42, 100, 166],
]
# Only the height changes (PIL skips the horizontal pass): width 13, height 4, channel 2.
PIL_13x4_C2 = [
    [141, 187, 124, 169, 203, 115, 51, 85, 131, 177, 223, 13, 58],
    [90, 163, 112, 185, 124, 125, 146, 85, 86, 158, 230, 47, 119],
    [156, 126, 107, 77, 130, 162, 81, 185, 32, 136, 240, 87, 191],
    [105, 88, 109, 93, 113, 109, 117, 113, 121, 117, 247, 121, 117],
]
# Only the width changes: width 4, height 7, channel 1.
PIL_4x7_C1 = [
    [106, 161, 94, 188], [174, 131, 98, 144], [129, 102, 126, 159], [149, 167, 106, 88],
    [104, 122, 140, 113], [182, 163, 144, 127], [164, 119, 108, 142],
]


def test_golden_values_from_pil() -> None:
    img = _pattern()
    np.testing.assert_array_equal(pil_bilinear_resize(img, 3, 5), np.array(PIL_5x3).transpose(1, 2, 0))
    np.testing.assert_array_equal(pil_bilinear_resize(img, 11, 20)[..., 0], PIL_20x11_C0)
    np.testing.assert_array_equal(pil_bilinear_resize(img, 4, 13)[..., 2], PIL_13x4_C2)
    np.testing.assert_array_equal(pil_bilinear_resize(img, 7, 4)[..., 1], PIL_4x7_C1)


def _reference_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PIL's two 8-bit passes written plainly with the dense fixed-point matrices, in int64."""
    x = image.astype(np.int64)
    half = 1 << (PRECISION_BITS - 1)
    if image.shape[1] != out_w:
        k = resize_weights_fixed(image.shape[1], out_w).astype(np.int64)
        x = np.clip((np.einsum("ow,hwc->hoc", k, x) + half) >> PRECISION_BITS, 0, 255)
    if image.shape[0] != out_h:
        k = resize_weights_fixed(image.shape[0], out_h).astype(np.int64)
        x = np.clip((np.einsum("oh,hwc->owc", k, x) + half) >> PRECISION_BITS, 0, 255)
    return x.astype(np.uint8)


@pytest.mark.parametrize(
    ("in_hw", "out_hw"),
    [((480, 640), (168, 224)), ((200, 300), (149, 224)), ((50, 100), (112, 224)), ((37, 53), (61, 19)),
     ((7, 13), (3, 5)), ((1, 9), (4, 2)), ((3, 2000), (3, 11)), ((2, 6000), (2, 40))],  # 6000->40: >128x
)
def test_fast_passes_equal_the_plain_fixed_point_definition(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
    for img in (rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8),
                (rng.integers(0, 2, (*in_hw, 3)) * 255).astype(np.uint8)):
        np.testing.assert_array_equal(pil_bilinear_resize(img, *out_hw), _reference_resize(img, *out_hw))


@pytest.mark.parametrize(("in_hw", "out_hw"), [((480, 640), (168, 224)), ((2, 6000), (2, 40))])
def test_passes_in_column_blocks_equal_one_block(monkeypatch, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    img = np.random.default_rng(3).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    whole = pil_bilinear_resize(img, *out_hw)
    monkeypatch.setattr(resize, "_GATHER_BYTES", 5000)  # blocks of a few columns, and a last short one
    np.testing.assert_array_equal(pil_bilinear_resize(img, *out_hw), whole)
    np.testing.assert_array_equal(whole, _reference_resize(img, *out_hw))


def test_a_4k_frame_is_resized_without_gathering_its_whole_pass() -> None:
    # A 3840x2160 frame's width pass gathers 224 x 37 taps x 6480 columns: ~54 MB at once per
    # camera before the passes went in column blocks (peak 82 MB here, 49 MB in blocks; the
    # transposed copy of the frame is 25 MB of it).
    img = np.random.default_rng(4).integers(0, 256, (2160, 3840, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        pil_bilinear_resize(img, 126, 224)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 60 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_the_tap_cache_keeps_a_few_frame_sizes_not_dozens() -> None:
    # Frames of ever new sizes (a camera without camera_height / camera_width whose driver, or a
    # sender, keeps changing them) each leave their taps cached. The widest frame the node takes
    # (2^25 pixels at a 224:1 aspect, ~86,000 wide) needs ~3.5 MB of them: 64 entries were ~220 MB.
    resize._taps.cache_clear()
    tracemalloc.start()
    try:
        for width in range(86_000, 86_040):
            resize._taps(width, 223)
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        resize._taps.cache_clear()
    assert retained < 64 * 2**20, f"{retained / 2**20:.1f} MiB"


@pytest.mark.parametrize(("n_in", "n_out"), [(640, 224), (480, 168), (1280, 224), (100, 224), (7, 3), (3, 7),
                                             (224, 224), (1, 5), (5, 1), (13, 20)])
def test_weights_rows_sum_to_one_and_follow_pil_support(n_in: int, n_out: int) -> None:
    w = resize_weights(n_in, n_out)
    k = resize_weights_fixed(n_in, n_out)
    assert w.shape == k.shape == (n_out, n_in) and w.dtype == np.float64 and k.dtype == np.int32
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all() and (k >= 0).all()
    np.testing.assert_array_equal(k, np.trunc(0.5 + w * 2**PRECISION_BITS))
    assert np.abs(k.sum(axis=1) - 2**PRECISION_BITS).max() <= 8  # per-tap rounding only
    # triangle support: half-width max(scale, 1) input pixels around each centre
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale
    distance = np.abs(np.arange(n_in)[None, :] + 0.5 - centres[:, None])
    assert (w[distance >= max(scale, 1.0)] == 0).all()
    np.testing.assert_allclose(w, w / w.sum(axis=1, keepdims=True))


def test_same_size_weights_are_the_identity() -> None:
    np.testing.assert_array_equal(resize_weights(9, 9), np.eye(9))
    np.testing.assert_array_equal(resize_weights_fixed(9, 9), np.eye(9, dtype=np.int32) << PRECISION_BITS)


@pytest.mark.parametrize("value", [0, 1, 127, 254, 255])
@pytest.mark.parametrize(("in_hw", "out_hw"), [((480, 640), (168, 224)), ((50, 100), (112, 224)), ((13, 7), (5, 3))])
def test_constant_images_stay_constant(value: int, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    out = pil_bilinear_resize(np.full((*in_hw, 3), value, dtype=np.uint8), *out_hw)
    assert out.shape == (*out_hw, 3) and out.dtype == np.uint8
    assert (out == value).all()


def test_channels_are_independent_and_layouts_do_not_matter() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    out = pil_bilinear_resize(img, 25, 41)
    for c in range(3):
        np.testing.assert_array_equal(pil_bilinear_resize(img[:, :, c], 25, 41), out[:, :, c])
    view = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)[::-1, 5:95]
    np.testing.assert_array_equal(pil_bilinear_resize(view, 30, 40), pil_bilinear_resize(view.copy(), 30, 40))
    same = pil_bilinear_resize(img, 60, 90)
    np.testing.assert_array_equal(same, img)
    assert not np.shares_memory(same, img)


def test_rejects_non_uint8_and_bad_sizes() -> None:
    with pytest.raises(ValueError):
        pil_bilinear_resize(np.zeros((4, 4, 3), dtype=np.float32), 2, 2)
    with pytest.raises(ValueError):
        pil_bilinear_resize(np.zeros((4, 4, 3), dtype=np.uint8), 0, 2)


@pytest.mark.parametrize(
    ("in_hw", "resized_hw", "top_left"),
    [((480, 640), (168, 224), (28, 0)), ((720, 1280), (126, 224), (49, 0)), ((300, 200), (224, 149), (0, 37)),
     ((50, 100), (112, 224), (56, 0)), ((13, 7), (224, 120), (0, 52))],
)
def test_resize_with_pad_pastes_the_pil_resize_centred_on_black(
    in_hw: tuple[int, int], resized_hw: tuple[int, int], top_left: tuple[int, int]
) -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(1, 256, (*in_hw, 3), dtype=np.uint8)
    out = resize_with_pad(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    (top, left), (h, w) = top_left, resized_hw
    np.testing.assert_array_equal(out[top:top + h, left:left + w], pil_bilinear_resize(img, h, w))
    mask = np.zeros((224, 224), dtype=bool)
    mask[top:top + h, left:left + w] = True
    assert not out[~mask].any()


def test_resize_with_pad_keeps_224_images() -> None:
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert resize_with_pad(img) is img
