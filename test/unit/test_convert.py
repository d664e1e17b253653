"""ros/convert.py: every image encoding, row padding, compressed images, joint states, and each bad case."""

import re
import struct
import warnings
from collections import Counter
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Header

from pi0_policy_ros.control.trajectory import plan_trajectory
from pi0_policy_ros.errors import ObservationError, Pi0PolicyError
from pi0_policy_ros.ros import convert

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)  # odd sizes catch stride mistakes


def make_image(pixels: np.ndarray, encoding: str, pad: int = 0) -> Image:
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1)
    padded = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    return Image(height=h, width=w, encoding=encoding, step=padded.shape[1], data=padded.tobytes())


def encode(encoding: str) -> np.ndarray:
    """RGB -> the raw pixel layout of `encoding`."""
    return {
        "rgb8": RGB,
        "bgr8": RGB[:, :, ::-1],
        "rgba8": np.concatenate([RGB, np.full((5, 7, 1), 9, np.uint8)], axis=2),
        "bgra8": np.concatenate([RGB[:, :, ::-1], np.full((5, 7, 1), 9, np.uint8)], axis=2),
    }[encoding]


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_give_rgb(encoding: str, pad: int) -> None:
    out = convert.image_to_rgb(make_image(np.ascontiguousarray(encode(encoding)), encoding, pad))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("pad", [0, 1])
def test_mono8_is_replicated_to_three_channels(pad: int) -> None:
    gray = RGB[:, :, 0].copy()
    out = convert.image_to_rgb(make_image(gray[:, :, None], "mono8", pad))
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_longer_data_than_step_times_height_is_refused() -> None:
    msg = make_image(RGB, "rgb8")
    msg.data = bytes(msg.data) + b"\x00" * 10
    with pytest.raises(ObservationError, match=r"data too long: expected step\*height = 21\*5 = 105 bytes, found 115"):
        convert.image_to_rgb(msg)


def test_rgba_pixels_labelled_rgb8_are_refused() -> None:
    # A mislabelled encoding: 4 bytes a pixel sent as rgb8 with step = width*3. Reading the first
    # step*height bytes gives scrambled colours (cv_bridge refuses height*step != data size).
    rgba = np.ascontiguousarray(encode("rgba8"))
    msg = Image(height=5, width=7, encoding="rgb8", step=21, data=rgba.tobytes())
    with pytest.raises(ObservationError, match=r"data too long: expected step\*height = 21\*5 = 105 bytes, found 140"):
        convert.image_to_rgb(msg)


def test_rosbags_message_with_numpy_data() -> None:
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    Img = ts.types["sensor_msgs/msg/Image"]
    hdr = ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=1, nanosec=5), frame_id="")
    msg = Img(header=hdr, height=5, width=7, encoding="bgr8", is_bigendian=0, step=21,
              data=np.ascontiguousarray(RGB[:, :, ::-1]).reshape(-1))
    np.testing.assert_array_equal(convert.image_to_rgb(msg), RGB)
    assert convert.stamp_to_seconds(msg.header.stamp) == pytest.approx(1.000000005)


@pytest.mark.parametrize("encoding", ["yuv422", "16UC1", "rgb16", "bayer_rggb8", "made_up", ""])
def test_unsupported_encoding(encoding: str) -> None:
    msg = make_image(RGB, "rgb8")
    msg.encoding = encoding
    with pytest.raises(ObservationError, match=r"unsupported image encoding.*expected one of.*found"):
        convert.image_to_rgb(msg)


def test_step_smaller_than_row() -> None:
    msg = make_image(RGB, "rgb8")
    msg.step = 20
    with pytest.raises(ObservationError, match=r"step too small: expected >= .* = 21 bytes, found 20"):
        convert.image_to_rgb(msg)


def test_data_shorter_than_step_times_height() -> None:
    msg = make_image(RGB, "rgb8", pad=2)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(ObservationError, match=r"data too short: expected step\*height = 23\*5 = 115 bytes, found 114"):
        convert.image_to_rgb(msg)


@pytest.mark.parametrize("height,width", [(0, 7), (5, 0), (0, 0)])
def test_zero_size(height: int, width: int) -> None:
    msg = Image(height=height, width=width, encoding="rgb8", step=width * 3, data=b"")
    with pytest.raises(ObservationError, match="empty image"):
        convert.image_to_rgb(msg)


# ---- compressed --------------------------------------------------------------------------------

def compressed(ext: str, pixels: np.ndarray, fmt: str) -> CompressedImage:
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return CompressedImage(format=fmt, data=buf.tobytes())


def test_png_is_lossless_and_rgb() -> None:
    msg = compressed(".png", np.ascontiguousarray(RGB[:, :, ::-1]), "rgb8; png compressed bgr8")
    np.testing.assert_array_equal(convert.compressed_image_to_rgb(msg), RGB)


def test_mono_png_becomes_three_channels() -> None:
    gray = RGB[:, :, 1].copy()
    out = convert.compressed_image_to_rgb(compressed(".png", gray, "mono8; png compressed mono8"))
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out[:, :, 2], gray)


@pytest.mark.parametrize("fmt", ["rgb8; jpeg compressed bgr8", "jpeg", ""])
def test_jpeg_channel_order(fmt: str) -> None:
    # A flat red image survives JPEG nearly exactly, so the channel order is unambiguous.
    red_rgb = np.zeros((16, 16, 3), np.uint8)
    red_rgb[:, :, 0] = 200
    out = convert.compressed_image_to_rgb(compressed(".jpg", np.ascontiguousarray(red_rgb[:, :, ::-1]), fmt))
    assert out.shape == (16, 16, 3)
    assert abs(int(out[..., 0].mean()) - 200) <= 3 and out[..., 2].mean() < 5


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """`jpeg` with an APP1 Exif segment holding one IFD0 entry: Orientation (0x0112, SHORT)."""
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_jpeg_exif_orientation_is_ignored() -> None:
    # image_transport's compressed subscriber (imdecode mode "unchanged") and cv_bridge keep the
    # pixels as sent; a rotated frame is not what the policy was trained on.
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16, 0] = 200  # left half red
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    msg = CompressedImage(format="rgb8; jpeg compressed bgr8", data=_with_exif_orientation(buf.tobytes(), 6))
    out = convert.compressed_image_to_rgb(msg)
    assert out.shape == (16, 32, 3)
    assert out[:, 2:14, 0].min() > 190 and out[:, 18:30, 0].max() < 10


@pytest.mark.parametrize("data", [b"", b"\x00" * 64, b"not a jpeg at all", b"\xff\xd8\xff\xe0" + b"\x00" * 10])
def test_corrupt_compressed(data: bytes) -> None:
    with pytest.raises(ObservationError, match=r"(cannot decode|empty compressed).*expected JPEG or PNG"):
        convert.compressed_image_to_rgb(CompressedImage(format="jpeg", data=data))


def _jpeg_claiming(width: int, height: int, progressive: bool = False) -> bytes:
    """A small JPEG whose frame header (SOF0, or SOF2 when progressive) claims width x height."""
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_claiming(width: int, height: int) -> bytes:
    import zlib

    data = bytearray(compressed(".png", RGB, "png").data)
    data[16:24] = struct.pack(">II", width, height)  # IHDR, with its CRC made right again
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("data", [_jpeg_claiming(8000, 5000), _jpeg_claiming(8000, 5000, progressive=True),
                                  _png_claiming(8000, 5000)], ids=["jpeg", "progressive_jpeg", "png"])
def test_a_header_claiming_a_huge_frame_is_refused_before_decoding(data: bytes) -> None:
    """A corrupt size field under OpenCV's own limit (2^30 pixels): imdecode took it, allocated the frame
    and filled what the data lacked with grey, so that a ~1 kB JPEG claiming 30000x30000 took 5 GB and
    15 s of the control tick on the CPU (and was then used as an observation)."""
    msg = CompressedImage(format="rgb8; jpeg compressed bgr8", data=data)
    with pytest.raises(ObservationError, match=r"cannot decode compressed image .*: expected JPEG or PNG of at "
                                               r"most 33554432 pixels .*found a header claiming 8000x5000"):
        convert.compressed_image_to_rgb(msg)


def test_a_progressive_jpeg_after_an_exif_thumbnail_decodes() -> None:
    """The frame size is read from the first frame header, past APPn segments (an Exif thumbnail is a
    JPEG inside APP1, with its own)."""
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16, 0] = 200
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    thumbnail = _jpeg_claiming(60000, 60000)
    app1 = b"Exif\x00\x00" + thumbnail
    data = buf.tobytes()[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + buf.tobytes()[2:]
    out = convert.compressed_image_to_rgb(CompressedImage(format="jpeg", data=data))
    assert out.shape == (16, 32, 3) and out[:, 2:14, 0].min() > 190


def test_compressed_depth_is_refused() -> None:
    msg = compressed(".png", RGB, "16UC1; compressedDepth png")
    with pytest.raises(ObservationError, match="unsupported compressed format"):
        convert.compressed_image_to_rgb(msg)


@pytest.mark.parametrize("fmt,ext", [("16UC1; png compressed ", ".png"), ("16UC1; jpeg compressed mono8", ".jpg"),
                                     ("32FC1; tiff compressed ", ".png")])
def test_a_depth_image_on_compressed_transport_is_refused(fmt: str, ext: str) -> None:
    # image_transport's compressed publisher on a depth topic (a camera remapped to the wrong
    # stream): the PNG holds millimetres, which an 8-bit colour decode would pass on as a grey frame.
    depth = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1000)
    msg = compressed(ext, depth if ext == ".png" else (depth >> 8).astype(np.uint8), fmt)
    with pytest.raises(ObservationError, match=r"unsupported compressed image: expected a colour or mono source "
                                               r"encoding .*'rgb8'.*, found '(16UC1|32FC1)'"):
        convert.compressed_image_to_rgb(msg)


@pytest.mark.parametrize("channels,fmt", [(1, "mono16; png compressed "), (3, "bgr16; png compressed "),
                                          (3, "rgb16; png compressed "), (1, "png")])
def test_a_16_bit_png_is_refused_as_a_raw_16_bit_image_is(channels: int, fmt: str) -> None:
    # image_transport's compressed publisher writes a 16-bit source as a 16-bit PNG. Keeping its high
    # byte would guess a scaling (12-bit data comes out 16 times darker), and a raw mono16/rgb16
    # Image is refused, so this is too.
    pixels = (np.arange(35 * channels, dtype=np.uint16).reshape(5, 7, channels) * 1500).squeeze()
    msg = compressed(".png", pixels, fmt)
    assert bytes(msg.data[24:26]) == bytes([16, 0 if channels == 1 else 2])  # IHDR: bit depth, colour type
    with pytest.raises(ObservationError, match=r"unsupported compressed image: expected 8 bits per channel "
                                               r"\(.*'mono8'.*\), found 16 bits per channel"):
        convert.compressed_image_to_rgb(msg)


# ---- joint states ------------------------------------------------------------------------------

NAMES = ["shoulder", "elbow", "wrist"]


def js(names, positions) -> JointState:
    return JointState(header=Header(stamp=Time(sec=3)), name=list(names), position=list(positions))


def test_joint_states_map_by_name() -> None:
    msg = js(["wrist", "extra", "shoulder", "elbow"], [3.0, 99.0, 1.0, 2.0])
    np.testing.assert_array_equal(convert.joint_positions(msg, NAMES), [1.0, 2.0, 3.0])


# Bad joint states and the error each must give (joint_positions and JointStateReader alike).
BAD_JOINT_STATES = [
    ([], [], "empty joint_states"),
    (["shoulder", "elbow"], [1.0, 2.0], r"lacks joints \['wrist'\]: expected all of"),
    (["shoulder", "elbow", "wrist", "elbow"], [1, 2, 3, 4], r"duplicate names.*\['elbow'\]"),
    (["shoulder", "elbow", "wrist"], [1.0, 2.0], r"position too short: expected one per name \(3\), found 2"),
    # JointState.msg: the arrays have the same size or are empty; with more positions than names
    # which value belongs to which joint is unknown.
    (["shoulder", "elbow", "wrist"], [1.0, 2.0, 3.0, 4.0], r"position too long: expected one per name \(3\), found 4"),
    (["shoulder", "elbow", "wrist"], [1.0, float("nan"), 3.0], r"non-finite.*'elbow'"),
    (["shoulder", "elbow", "wrist"], [float("inf"), 2.0, 3.0], r"non-finite.*'shoulder'"),
]


@pytest.mark.parametrize("names,positions,pattern", BAD_JOINT_STATES)
def test_bad_joint_states(names, positions, pattern) -> None:
    with pytest.raises(ObservationError, match=pattern):
        convert.joint_positions(js(names, positions), NAMES)


def test_nan_in_an_unused_joint_is_ignored() -> None:
    msg = js(NAMES + ["gripper"], [1.0, 2.0, 3.0, float("nan")])
    np.testing.assert_array_equal(convert.joint_positions(msg, NAMES), [1.0, 2.0, 3.0])


# ---- text a sender chose, in the error ----------------------------------------------------------
# A fuzzer's 1000-character encoding, and a JointState of 10000 names, went whole into the error, and
# from there into the log and /diagnostics. The error stays short and still says what was expected.

LONG = "x" * 1000
BOUND = 300  # characters of an error message


def refusal(convert_fn: Callable[..., Any], *args: Any) -> str:
    with pytest.raises(ObservationError) as info:
        convert_fn(*args)
    return str(info.value)


def test_a_long_image_encoding_is_cut_in_the_error() -> None:
    msg = make_image(RGB, "rgb8")
    msg.encoding = LONG
    text = refusal(convert.image_to_rgb, msg)
    assert len(text) < BOUND, text
    assert "expected one of ['bgr8', 'bgra8', 'mono8', 'rgb8', 'rgba8']" in text and "(1000 characters)" in text


@pytest.mark.parametrize("fmt,expected", [
    (LONG, "expected JPEG or PNG"),  # no source encoding: the bytes do not decode
    ("compressedDepth" + LONG, "expected JPEG or PNG colour/mono"),
    (LONG + "; jpeg compressed bgr8", "expected a colour or mono source encoding ['rgb8', 'bgr8'"),
])
def test_a_long_compressed_format_is_cut_in_the_error(fmt: str, expected: str) -> None:
    text = refusal(convert.compressed_image_to_rgb, CompressedImage(format=fmt, data=b"\x01\x02\x03\x04"))
    assert len(text) < BOUND + 100, text  # the source encoding and the format, each cut
    assert expected in text and "characters)" in text


@pytest.mark.parametrize("names,expected", [
    ([f"j{i}" for i in range(10000)], "lacks joints ['shoulder', 'elbow', 'wrist']: expected all of "
                                      "['shoulder', 'elbow', 'wrist'], found ['j0', 'j1',"),
    ([f"j{i}" for i in range(5000)] * 2, "duplicate names: expected each joint once, found ['j0', 'j1',"),
    (["a" * 100000, "b" * 100000], "expected all of ['shoulder', 'elbow', 'wrist'], found ['aaa"),
], ids=["10000_names", "5000_duplicates", "long_names"])
def test_many_or_long_joint_names_are_cut_in_the_error(names: list[str], expected: str) -> None:
    text = refusal(convert.joint_positions, js(names, [0.0] * len(names)), NAMES)
    assert len(text) < BOUND, text
    assert expected in text and re.search(r"( and \d+ more|\(100000 characters\)\])", text), text


def test_duplicate_names_are_found_in_time_linear_in_the_names() -> None:
    # names.count per name: a JointState of 20000 names, each twice, took ~5 s of the input thread
    # per message (10000 names ~1 s) before it was refused. Counted in name comparisons, not timed:
    # quadratic is ~n² of them (160000 here), counting the names once ~n.
    class CountedName(str):
        comparisons = 0

        def __eq__(self, other: object) -> bool:
            CountedName.comparisons += 1
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    names = [CountedName(f"j{i % 200}") for i in range(400)]
    text = refusal(convert.joint_positions, js(names, [0.0] * len(names)), NAMES)
    assert "duplicate names" in text
    assert CountedName.comparisons <= 4 * len(names)


# ---- outputs -----------------------------------------------------------------------------------

def test_action_chunk_layout_round_trip() -> None:
    actions = np.arange(12, dtype=np.float32).reshape(4, 3)
    msg = convert.action_chunk_message(actions)
    assert [(d.label, d.size, d.stride) for d in msg.layout.dim] == [("horizon", 4, 12), ("action", 3, 3)]
    assert msg.layout.data_offset == 0 and len(msg.data) == 12
    np.testing.assert_array_equal(convert.action_chunk_from_message(msg), actions)


def test_action_chunk_from_message_skips_data_offset() -> None:
    # std_msgs/MultiArrayLayout: data_offset is padding at the front of data, not part of the array.
    actions = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = convert.action_chunk_message(actions)
    msg.layout.data_offset = 2
    msg.data = [-9.0, -9.0] + list(msg.data)
    np.testing.assert_array_equal(convert.action_chunk_from_message(msg), actions)


def test_trajectory_message() -> None:
    actions = np.array([[0.0, 1.0], [0.5, 1.5], [1.0, 2.0]])
    plan = plan_trajectory(actions, period_s=0.1, stamp_s=100.0, now_s=100.05, min_lead_s=0.02)
    msg = convert.trajectory_message(plan, ["a", "b"])
    assert msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0
    assert msg.joint_names == ["a", "b"]
    assert len(msg.points) == 2
    assert list(msg.points[0].positions) == [0.5, 1.5]
    assert list(msg.points[0].velocities) == pytest.approx([5.0, 5.0])
    t = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
    assert t == pytest.approx([0.05, 0.15])


def test_trajectory_message_equals_its_point_by_point_definition() -> None:
    # Each point built with its own Duration, as before the points wrote into the constructor's:
    # the same message, nanosecond carries and whole seconds included.
    from builtin_interfaces.msg import Duration
    from trajectory_msgs.msg import JointTrajectoryPoint

    from pi0_policy_ros.control.trajectory import TrajectoryPlan, split_seconds

    times_s = np.array([0.0, 0.0333333333, 0.9999999996, 0.9999999994, 1.0, 2.5e-10, 12.020000000000001, 86400.5])
    rng = np.random.default_rng(3)
    plan = TrajectoryPlan(first_index=2, times_from_start_s=times_s, positions=rng.normal(size=(8, 3)),
                          velocities=rng.normal(size=(8, 3)))
    expected = [JointTrajectoryPoint(positions=q, velocities=v, time_from_start=Duration(
        sec=split_seconds(t)[0], nanosec=split_seconds(t)[1])) for t, q, v in
        zip(times_s.tolist(), plan.positions.tolist(), plan.velocities.tolist())]
    msg = convert.trajectory_message(plan, ["a", "b", "c"])
    assert msg.points == expected
    assert [(p.time_from_start.sec, p.time_from_start.nanosec) for p in msg.points][2:4] == [(1, 0), (0, 999999999)]


def test_trajectory_message_refuses_a_plan_of_other_width_than_the_joints() -> None:
    plan = plan_trajectory(np.zeros((3, 2)), period_s=0.1, stamp_s=100.0, now_s=100.05, min_lead_s=0.02)
    with pytest.raises(Pi0PolicyError, match=r"expected 3 action dims for joints \['a', 'b', 'c'\], found 2"):
        convert.trajectory_message(plan, ["a", "b", "c"])


def test_seconds_to_stamp() -> None:
    stamp = convert.seconds_to_stamp(1700000000.25)
    assert (stamp.sec, stamp.nanosec) == (1700000000, 250000000)


# ---- header stamps from serialized bytes (the node's raw camera subscriptions) -----------------

def _serialized(typename: str, little_endian: bool, **fields) -> bytes:
    """A message serialized as an RMW writes it (rosbags' CDR is byte-identical to rclpy's)."""
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    stamp = ts.types["builtin_interfaces/msg/Time"](sec=1700000000, nanosec=250_000_001)
    header = ts.types["std_msgs/msg/Header"](stamp=stamp, frame_id="camera_optical_frame")
    msg = ts.types[typename](header=header, **fields)
    return bytes(ts.serialize_cdr(msg, typename, little_endian=little_endian))


STAMPED = {
    "sensor_msgs/msg/Image": dict(height=5, width=7, encoding="rgb8", is_bigendian=0, step=21,
                                  data=RGB.reshape(-1)),
    "sensor_msgs/msg/CompressedImage": dict(format="jpeg", data=np.arange(9, dtype=np.uint8)),
    "sensor_msgs/msg/JointState": dict(name=["a"], position=np.array([0.5]), velocity=np.array([], np.float64),
                                       effort=np.array([], np.float64)),
}


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("typename", sorted(STAMPED))
def test_stamp_from_cdr_reads_the_header_stamp(typename: str, little_endian: bool) -> None:
    data = _serialized(typename, little_endian, **STAMPED[typename])
    assert convert.stamp_from_cdr(data) == pytest.approx(1700000000.250000001, abs=1e-9)


@pytest.mark.parametrize("data, pattern", [
    (b"\x00\x01\x00\x00\x01", "expected >= 12 serialized bytes"),
    (b"\x00\x03\x00\x00" + bytes(12), "expected plain CDR .* found 0x0003"),  # parameter list CDR
    (b"\x01\x01\x00\x00" + bytes(12), "found 0x0101"),
])
def test_stamp_from_cdr_refuses_what_it_cannot_read(data: bytes, pattern: str) -> None:
    with pytest.raises(ObservationError, match=pattern):
        convert.stamp_from_cdr(data)


# ---- joint states from serialized bytes (JointStateReader) --------------------------------------

def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_JAZZY)


def serialized_js(names, positions, frame_id: str = "", little_endian: bool = True, velocities=(),
                  efforts=()) -> bytes:
    ts = _typestore()
    header = ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=3, nanosec=0),
                                             frame_id=frame_id)
    msg = ts.types["sensor_msgs/msg/JointState"](
        header=header, name=list(names), position=np.asarray(positions, np.float64),
        velocity=np.asarray(velocities, np.float64), effort=np.asarray(efforts, np.float64))
    return bytes(ts.serialize_cdr(msg, "sensor_msgs/msg/JointState", little_endian=little_endian))


def rclpy_deserialize_js(data: bytes) -> JointState:
    return deserialize_message(data, JointState)


class CountingDeserializer:
    """A CDR decoder, counting calls: the reader's full path. rosbags' unless `decode` is given."""

    def __init__(self, decode: Callable[[bytes], Any] | None = None) -> None:
        self.calls = 0
        self._decode = decode
        self._ts = _typestore() if decode is None else None

    def __call__(self, data: bytes):
        self.calls += 1
        if self._decode is not None:
            return self._decode(data)
        return self._ts.deserialize_cdr(data, "sensor_msgs/msg/JointState")


@pytest.mark.parametrize("little_endian", [True, False])
def test_joint_state_reader_reads_repeated_names_in_place(little_endian: bool) -> None:
    deserialize = CountingDeserializer()
    reader = convert.JointStateReader(NAMES, deserialize)
    names = ["wrist", "gripper_finger", "shoulder", "elbow"]  # odd lengths: padding between names
    for i, frame_id in enumerate(["", "base", "a", "base_link_12", "ab", ""]):
        positions = [3.0 + i, 0.5, 1.0 - i, 2.0 * i]
        state = reader.positions(serialized_js(names, positions, frame_id, little_endian, velocities=[0.1] * 4))
        np.testing.assert_array_equal(state, [1.0 - i, 2.0 * i, 3.0 + i])
        assert state.dtype == np.float64 and state.flags.writeable
    assert deserialize.calls == 1  # the first message only; frame_id lengths move the names around
    reader.positions(serialized_js(["shoulder", "elbow", "wrist"], [1.0, 2.0, 3.0]))  # other names: full path
    assert deserialize.calls == 2


@pytest.mark.parametrize("names,positions,pattern", BAD_JOINT_STATES)
def test_joint_state_reader_refuses_as_joint_positions_does(names, positions, pattern) -> None:
    reader = convert.JointStateReader(NAMES, CountingDeserializer())
    reader.positions(serialized_js(NAMES, [1.0, 2.0, 3.0]))  # a known layout first: no shortcut may skip a check
    with pytest.raises(ObservationError, match=pattern):
        reader.positions(serialized_js(names, positions))


def test_joint_state_reader_ignores_nan_in_an_unused_joint_and_refuses_garbage() -> None:
    reader = convert.JointStateReader(NAMES, CountingDeserializer())
    for _ in range(2):
        state = reader.positions(serialized_js(NAMES + ["gripper"], [1.0, 2.0, 3.0, float("nan")]))
        np.testing.assert_array_equal(state, [1.0, 2.0, 3.0])
    good = serialized_js(NAMES, [1.0, 2.0, 3.0])
    with pytest.raises(ObservationError, match="cannot deserialize 30 bytes as sensor_msgs/JointState"):
        reader.positions(good[:30])  # truncated: the in-place read declines, the decoder refuses
    with pytest.raises(ObservationError, match="expected >= 16 serialized bytes, found 8"):
        reader.positions(good[:8])


def test_joint_state_reader_refuses_a_message_too_short_for_its_name_list() -> None:
    # 12-15 bytes: enough for a stamp, not for frame_id's length that the in-place read looks at.
    reader = convert.JointStateReader(NAMES, CountingDeserializer())
    good = serialized_js(NAMES, [1.0, 2.0, 3.0])
    reader.positions(good)
    with pytest.raises(ObservationError, match="expected >= 16 serialized bytes, found 15"):
        reader.positions(good[:15])


def test_joint_state_reader_ignores_what_the_padding_bytes_hold() -> None:
    # Fast-CDR leaves alignment padding uninitialised: the same names with other padding bytes are
    # still the same names, read in place.
    deserialize = CountingDeserializer()
    reader = convert.JointStateReader(NAMES, deserialize)
    names = ["wrist", "gripper_finger", "shoulder", "elbow"]  # 6, 15, 9, 6 bytes with NUL: padding after each
    first = serialized_js(names, [3.0, 0.5, 1.0, 2.0])
    reader.positions(first)
    data = bytearray(serialized_js(names, [13.0, 0.5, 11.0, 12.0]))
    offset = 4 + 8 + 4 + 4 + 4  # encapsulation, stamp, frame_id "" (length 1, NUL, padding), name count
    padded = 0
    for name in names:
        offset += 4 + len(name) + 1
        while offset % 4:
            data[offset] = 0xCD
            offset += 1
            padded += 1
    assert padded > 0 and bytes(data) != serialized_js(names, [13.0, 0.5, 11.0, 12.0])
    np.testing.assert_array_equal(reader.positions(bytes(data)), [11.0, 12.0, 13.0])
    assert deserialize.calls == 1


def test_joint_state_reader_takes_an_extra_name_for_another_name_list() -> None:
    # One more name whose length field (3: "ab" and its NUL) equals the known name count: the count,
    # not only the names, tells the lists apart; read in place, positions would come from the name bytes.
    reader = convert.JointStateReader(NAMES, CountingDeserializer())
    reader.positions(serialized_js(NAMES, [1.0, 2.0, 3.0]))
    state = reader.positions(serialized_js(NAMES + ["ab"], [4.0, 5.0, 6.0, 7.0]))
    np.testing.assert_array_equal(state, [4.0, 5.0, 6.0])


# (velocity, effort) pairs: each empty or one per name, as JointState.msg allows.
VELOCITY_EFFORT = [([], []), ([0.25, -0.5, 0.75], []), ([], [4.0, 5.0, 6.0]), ([0.25, -0.5, 0.75], [4.0, 5.0, 6.0])]


def js_bytes(positions, velocities, efforts, big_endian: bool) -> bytes:
    """A JointState of NAMES as the node receives it: rclpy's serializer (Fast-CDR: host order, padding
    left uninitialised, unused bytes at the end), or rosbags' for big endian, which rclpy never writes."""
    if big_endian:
        return serialized_js(NAMES, positions, "base", False, velocities, efforts)
    msg = JointState(header=Header(stamp=Time(sec=3), frame_id="base"), name=NAMES, position=list(positions),
                     velocity=list(velocities), effort=list(efforts))
    return bytes(serialize_message(msg))


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("velocities,efforts", VELOCITY_EFFORT)
def test_joint_state_reader_reads_velocity_and_effort_messages_in_place(velocities, efforts, big_endian) -> None:
    deserialize = CountingDeserializer(rclpy_deserialize_js)
    reader = convert.JointStateReader(NAMES, deserialize)
    needed = len(serialized_js(NAMES, [0.0] * 3, "base", velocities=velocities, efforts=efforts))  # rosbags: no extras
    for i in range(3):
        data = js_bytes([1.0 + i, 2.0, 3.0 - i], velocities, efforts, big_endian)
        np.testing.assert_array_equal(reader.positions(data), [1.0 + i, 2.0, 3.0 - i])
        np.testing.assert_array_equal(reader.positions(data[:needed]), [1.0 + i, 2.0, 3.0 - i])
    assert deserialize.calls == 1


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("velocities,efforts", VELOCITY_EFFORT)
def test_joint_state_reader_refuses_a_message_cut_short_after_its_positions(velocities, efforts, big_endian) -> None:
    # Names and positions intact, velocity or effort cut off: the deserializer refuses it, and the
    # in-place read must not return its positions instead.
    good = js_bytes([1.0, 2.0, 3.0], velocities, efforts, big_endian)
    positions_end = len(serialized_js(NAMES, [0.0] * 3, "base")) - 8  # less two empty sequence counts
    needed = len(serialized_js(NAMES, [0.0] * 3, "base", velocities=velocities, efforts=efforts))
    assert positions_end < needed < len(good) + 1
    # The ground truth: rclpy's deserializer takes the message from `needed` bytes on, not before.
    rclpy_deserialize_js(good[:needed])
    with pytest.raises(Exception):
        rclpy_deserialize_js(good[:needed - 1])
    deserialize = CountingDeserializer(rclpy_deserialize_js)
    reader = convert.JointStateReader(NAMES, deserialize)
    reader.positions(good)
    for length in range(positions_end, needed):
        with pytest.raises(ObservationError) as full_path:
            convert.JointStateReader(NAMES, rclpy_deserialize_js).positions(good[:length])
        calls = deserialize.calls
        with pytest.raises(ObservationError) as in_place:
            reader.positions(good[:length])
        assert str(in_place.value) == str(full_path.value)
        assert f"cannot deserialize {length} bytes as sensor_msgs/JointState" in str(in_place.value)
        assert deserialize.calls == calls + 1


def test_stamp_from_cdr_needs_the_whole_stamp() -> None:
    data = _serialized("sensor_msgs/msg/JointState", True, **STAMPED["sensor_msgs/msg/JointState"])
    with pytest.raises(ObservationError, match="expected >= 12 serialized bytes .* found 11"):
        convert.stamp_from_cdr(data[:11])


@pytest.mark.parametrize("encapsulation,endian", [(0x06, ">"), (0x07, "<")])
def test_stamp_from_cdr_reads_plain_xcdr2(encapsulation: int, endian: str) -> None:
    # PLAIN_CDR2, big (0x0006) and little (0x0007) endian: no DHEADER, the stamp follows the encapsulation.
    data = bytes([0, encapsulation, 0, 0]) + struct.pack(endian + "iI", 1700000000, 250_000_001) + bytes(8)
    assert convert.stamp_from_cdr(data) == pytest.approx(1700000000.250000001, abs=1e-9)


def test_action_chunk_from_message_refuses_other_dims() -> None:
    msg = convert.action_chunk_message(np.zeros((2, 3), np.float32))
    msg.layout.dim[0].label, msg.layout.dim[1].label = "action", "horizon"
    with pytest.raises(ObservationError, match=r"expected dims \['horizon', 'action'\], found \['action', 'horizon'\]"):
        convert.action_chunk_from_message(msg)


def xcdr2_js(names: list[str], positions: list[float], frame_id: str = "") -> bytes:
    """A little-endian plain XCDR2 JointState (encapsulation 0x0007): as XCDR1, but float64 values
    align to 4, not 8. Fast-CDR v2 reads it; rosbags writes XCDR1 only, so it is built here."""
    out = bytearray(b"\x00\x07\x00\x00") + struct.pack("<iI", 3, 0)

    def string(text: str) -> None:
        out.extend(b"\x00" * (-(len(out) - 4) % 4))
        out.extend(struct.pack("<I", len(text) + 1) + text.encode() + b"\x00")

    string(frame_id)
    out.extend(b"\x00" * (-(len(out) - 4) % 4) + struct.pack("<I", len(names)))
    for name in names:
        string(name)
    out.extend(b"\x00" * (-(len(out) - 4) % 4))
    out.extend(struct.pack(f"<I{len(positions)}d", len(positions), *positions) + struct.pack("<II", 0, 0))
    return bytes(out)


@pytest.mark.parametrize("frame_id", ["", "ab", "abcde"])
def test_joint_state_reader_reads_xcdr2_through_the_deserializer_after_an_xcdr1_layout(frame_id: str) -> None:
    # The same names in XCDR2 sit where the known XCDR1 layout expects them, but where XCDR1 pads the
    # positions to 8 bytes XCDR2 does not: read in place, they came out shifted by 4 bytes.
    xcdr2 = xcdr2_js(NAMES, [1.0, 2.0, 3.0], frame_id)
    np.testing.assert_array_equal(rclpy_deserialize_js(xcdr2).position, [1.0, 2.0, 3.0])
    deserialize = CountingDeserializer(rclpy_deserialize_js)
    reader = convert.JointStateReader(NAMES, deserialize)
    reader.positions(serialized_js(NAMES, [4.0, 5.0, 6.0], frame_id))
    np.testing.assert_array_equal(reader.positions(xcdr2), [1.0, 2.0, 3.0])
    assert deserialize.calls == 2


# ---- images read in place from serialized bytes (image_fields_from_cdr) -------------------------

def _serialized_image(typename: str, little_endian: bool, frame_id: str, **fields) -> bytes:
    ts = _typestore()
    header = ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=5, nanosec=7),
                                             frame_id=frame_id)
    msg = ts.types[typename](header=header, **fields)
    return bytes(ts.serialize_cdr(msg, typename, little_endian=little_endian))


IMAGES_IN_PLACE = [  # (typename, fields): data sizes, encodings and strings that move the fields around
    ("sensor_msgs/msg/Image", dict(height=5, width=7, encoding="rgb8", is_bigendian=0, step=21, data=RGB.reshape(-1))),
    ("sensor_msgs/msg/Image", dict(height=5, width=7, encoding="bgr8", is_bigendian=1, step=24,
                                   data=np.frombuffer(make_image(RGB, "bgr8", pad=3).data, np.uint8))),
    ("sensor_msgs/msg/Image", dict(height=5, width=7, encoding="mono8", is_bigendian=0, step=7,
                                   data=RGB[:, :, 0].reshape(-1))),
    ("sensor_msgs/msg/Image", dict(height=2, width=3, encoding="16UC1", is_bigendian=0, step=6,
                                   data=np.arange(12, dtype=np.uint8))),
    ("sensor_msgs/msg/Image", dict(height=5, width=7, encoding="rgb8", is_bigendian=0, step=21,
                                   data=RGB.reshape(-1)[:50])),  # too short: refused alike either way
    ("sensor_msgs/msg/Image", dict(height=0, width=0, encoding="", is_bigendian=0, step=0,
                                   data=np.zeros(0, np.uint8))),
    ("sensor_msgs/msg/CompressedImage", dict(format="jpeg", data=np.arange(9, dtype=np.uint8))),
    ("sensor_msgs/msg/CompressedImage", dict(format="rgb8; jpeg compressed bgr8",
                                             data=np.frombuffer(cv2.imencode(".jpg", RGB)[1].tobytes(), np.uint8))),
    ("sensor_msgs/msg/CompressedImage", dict(format="", data=np.zeros(0, np.uint8))),
]


def _decoded(decode: Callable[[Any], np.ndarray], msg: Any) -> np.ndarray | str:
    try:
        return decode(msg)
    except ObservationError as exc:
        return str(exc)


@pytest.mark.parametrize("frame_id", ["", "c", "cam", "camera_optical_frame"])
@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("typename, fields", IMAGES_IN_PLACE)
def test_image_fields_from_cdr_equal_the_deserialized_message(typename: str, fields: dict, little_endian: bool,
                                                              frame_id: str) -> None:
    # The same fields as rclpy's deserializer gives, and so the same image or the same refusal.
    data = _serialized_image(typename, little_endian, frame_id, **fields)
    compressed = typename.endswith("CompressedImage")
    read = convert.image_fields_from_cdr(data, compressed)
    msg = deserialize_message(data, CompressedImage if compressed else Image)
    assert read is not None and bytes(read.data) == bytes(msg.data) and not read.data.flags.writeable
    names = ("format",) if compressed else ("height", "width", "encoding", "step")
    assert [getattr(read, n) for n in names] == [getattr(msg, n) for n in names]
    decode = convert.compressed_image_to_rgb if compressed else convert.image_to_rgb
    expected, found = _decoded(decode, msg), _decoded(decode, read)
    if isinstance(expected, str):
        assert found == expected
    else:
        np.testing.assert_array_equal(found, expected)


def _with(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw):]


def test_image_fields_from_cdr_leaves_what_is_not_plain_to_the_deserializer() -> None:
    # Bytes the deserializer may refuse or read otherwise: None, so that the node deserializes them.
    data = _serialized_image("sensor_msgs/msg/Image", True, "cam", height=5, width=7, encoding="rgb8",
                             is_bigendian=0, step=21, data=RGB.reshape(-1))
    encoding_at = 4 + 8 + 8 + 8  # encapsulation, stamp, frame_id "cam" (length 4), height and width
    assert data[encoding_at:encoding_at + 9] == b"\x05\x00\x00\x00rgb8\x00"
    pixels_at = len(data) - RGB.size
    assert all(convert.image_fields_from_cdr(data[:n], False) is None for n in range(pixels_at))  # cut short
    for n in range(pixels_at, len(data)):  # cut in its pixels: refused as the deserializer refuses it
        with pytest.raises(ObservationError, match=rf"cannot deserialize {n} bytes as Image: expected CDR of "
                                                   rf"sensor_msgs/Image, found a data field of {RGB.size} bytes "
                                                   rf"with {n - pixels_at} left \(a message cut short\?\)"):
            convert.image_fields_from_cdr(data[:n], False)
        with pytest.raises(Exception):
            deserialize_message(data[:n], Image)
    for bad in (_with(data, 1, b"\x07"),  # XCDR2
                _with(data, 2, b"\x00\x01"),  # encapsulation options
                _with(data, 12, b"\x00\x00\x00\x00"),  # frame_id of length 0
                _with(data, 16, b"\xff"),  # a frame_id that is not ASCII (nor UTF-8)
                _with(data, encoding_at + 4, b"rg\x00"),  # a NUL inside the encoding
                _with(data, encoding_at + 4, b"rgb8\x01"),  # no NUL at its end
                _with(data, encoding_at + 4, b"rg\xc3\xa9"),  # not ASCII
                _with(data, encoding_at, b"\x00\x00\x00\x00"),  # an encoding of length 0
                _with(data, encoding_at, b"\xff\xff\x00\x00")):  # longer than the message
        assert convert.image_fields_from_cdr(bad, False) is None
    assert convert.image_fields_from_cdr(data, True) is None  # an Image read as a CompressedImage: strings misfit


def _mutation_seeds() -> list[tuple[bool, bytes, int]]:
    """(compressed, serialized message, end of the fields before its pixel bytes): every frame_id
    length modulo 4, both byte orders, raw encodings with and without padded rows, JPEG and PNG with
    and without a source encoding in the format."""
    raw = [dict(encoding="rgb8", step=21, data=RGB.reshape(-1)),
           dict(encoding="bgr8", step=24,
                data=np.frombuffer(make_image(RGB[:, :, ::-1], "bgr8", pad=3).data, np.uint8)),
           dict(encoding="mono8", step=7, data=RGB[:, :, 0].reshape(-1)),
           dict(encoding="rgba8", step=28, data=encode("rgba8").reshape(-1)),
           dict(encoding="rgb8", step=25, data=np.frombuffer(make_image(RGB, "rgb8", pad=4).data, np.uint8))]
    jpeg, png = (np.frombuffer(cv2.imencode(ext, RGB[:, :, ::-1])[1].tobytes(), np.uint8) for ext in (".jpg", ".png"))
    packed = [dict(format="rgb8; jpeg compressed bgr8", data=jpeg), dict(format="jpeg", data=jpeg),
              dict(format="bgr8; png compressed bgr8", data=png), dict(format="png", data=png)]
    seeds = []
    for frame_id in ("", "c", "ab", "cam", "camera_optical_frame"):
        for little_endian in (True, False):
            for fields in raw:
                data = _serialized_image("sensor_msgs/msg/Image", little_endian, frame_id, height=5, width=7,
                                         is_bigendian=0, **fields)
                seeds.append((False, data, len(data) - fields["data"].size))
            for fields in packed:
                data = _serialized_image("sensor_msgs/msg/CompressedImage", little_endian, frame_id, **fields)
                seeds.append((True, data, len(data) - fields["data"].size))
    return seeds


def _mutation_at(rng: np.random.Generator, fields_end: int, size: int) -> int:
    """Mostly in the fields (what the reader parses), sometimes anywhere (the pixels, passed on alike)."""
    return int(rng.integers(fields_end if rng.random() < 0.8 else size))


def _mutated(rng: np.random.Generator, data: bytes, fields_end: int) -> tuple[str, bytes]:
    """One random mutation of a serialized message (kind, bytes)."""
    out = bytearray(data)
    kind = ("flip", "set", "cut", "insert", "length")[int(rng.integers(5))]
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            out[_mutation_at(rng, fields_end, len(out))] ^= 1 << int(rng.integers(8))
    elif kind == "set":
        out[_mutation_at(rng, fields_end, len(out))] = (0x00, 0xFF, int(rng.integers(256)))[int(rng.integers(3))]
    elif kind == "cut":
        del out[int(rng.integers(len(out))):]
    elif kind == "insert":
        at = _mutation_at(rng, fields_end, len(out))
        out[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    else:  # a 4-byte word of the fields (a length, count or size) set to a boundary value
        at = 4 * int(rng.integers(1, fields_end // 4))
        u32 = struct.Struct("<I" if data[1] == 1 else ">I")
        (old,) = u32.unpack_from(out, at)
        value = (0, 1, 2, 3, 4, 2**31 - 1, 2**31, 2**32 - 1, len(out), len(out) - at - 4, len(out) - at - 3,
                 old + 1, old - 1, old + 4)[int(rng.integers(14))]
        u32.pack_into(out, at, value % 2**32)
    return kind, bytes(out)


def _deserialized_then_decoded(data: bytes, compressed: bool) -> np.ndarray | str | None:
    """The node's path before the in-place reader: None where rclpy's deserializer refuses the bytes."""
    msg_type = CompressedImage if compressed else Image
    try:
        msg = deserialize_message(data, msg_type)
    except Exception:  # noqa: BLE001 - rclpy raises its RMWError (or others) for malformed CDR
        return None
    return _decoded(convert.compressed_image_to_rgb if compressed else convert.image_to_rgb, msg)


def test_image_fields_from_cdr_decode_mutated_bytes_as_the_deserializer_does() -> None:
    # Differential: for every mutant the reader reads (not None), decoding its fields gives the image,
    # or the refusal text, that deserializing and decoding gives; None is always safe (the node then
    # deserializes). The reader raises only where the pixel data runs past the end, which the
    # deserializer refuses too.
    rng = np.random.default_rng(20250607)
    seeds = _mutation_seeds()
    outcomes: Counter = Counter()
    refused_otherwise = []  # read in place and refused, where the deserializer refused first
    for _ in range(10000):  # ~1 s on the 2-core CPU machine; a third of them are read in place
        compressed, data, fields_end = seeds[int(rng.integers(len(seeds)))]
        kind, mutant = _mutated(rng, data, fields_end)
        try:
            read = convert.image_fields_from_cdr(mutant, compressed)
        except ObservationError:  # pixel data past the end: the deserializer must refuse it too
            assert _deserialized_then_decoded(mutant, compressed) is None, f"{kind} mutant {mutant.hex()}"
            outcomes["cut short"] += 1
            continue
        if read is None:
            outcomes["deserializer"] += 1
            continue
        found = _decoded(convert.compressed_image_to_rgb if compressed else convert.image_to_rgb, read)
        expected = _deserialized_then_decoded(mutant, compressed)
        context = f"{kind} mutant {mutant.hex()}"
        if expected is None:
            assert isinstance(found, str), f"an image where the deserializer refused: {context}"
            refused_otherwise.append(found)
        elif isinstance(expected, str):
            assert found == expected, context
        else:
            assert not isinstance(found, str), f"refused ({found}) where the deserializer gave an image: {context}"
            np.testing.assert_array_equal(found, expected, err_msg=context)
        outcomes["refused" if isinstance(found, str) else "image"] += 1
    # Not vacuous: many mutants are read in place, some decoding to images and some refused.
    assert min(outcomes.values()) > 500, outcomes
    if refused_otherwise:
        warnings.warn(f"{len(refused_otherwise)} mutants read in place were refused with another text than "
                      f"the node's 'cannot deserialize', e.g. {refused_otherwise[0]}")
