"""ROS messages <-> numpy, without cv_bridge.

Inputs are duck-typed (rclpy messages and `rosbags` messages have the same fields), and every bad
input raises `ObservationError` saying what was expected and what was found. Images come out as
uint8 RGB [H, W, 3]; an unpadded rgb8 image is a read-only view of the message buffer.

Outputs: `JointTrajectory` from a `TrajectoryPlan`, and the action chunk as a
`Float32MultiArray` with dims `horizon` (size H, stride H*A) and `action` (size A, stride A),
data_offset 0, row-major. The multiarray has no header: see `ros/node.py` for how its
observation stamp is published.
"""

from __future__ import annotations

import array
import math
import struct
from collections import Counter
from typing import Any, Callable, NamedTuple, Sequence

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from std_msgs.msg import Float32MultiArray, MultiArrayDimension
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from pi0_policy_ros.control.trajectory import TrajectoryPlan, split_seconds
from pi0_policy_ros.errors import ObservationError, Pi0PolicyError, echo

# encoding -> (channels, OpenCV conversion to RGB or None when already RGB).
IMAGE_ENCODINGS: dict[str, tuple[int, int | None]] = {
    "rgb8": (3, None),
    "bgr8": (3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, cv2.COLOR_GRAY2RGB),
}


# The source encodings (before ';' in a CompressedImage format, as image_transport's compressed
# publisher writes "<encoding>; jpeg compressed bgr8") of colour or intensity pictures. A 16-bit one
# passes only as an 8-bit JPEG (the publisher converted it); as a 16-bit PNG it is refused when
# decoded, like a raw mono16 Image. Depth (16UC1, 32FC1) and other data are refused, as in a raw Image.
COMPRESSED_SOURCE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8",
                               "rgb16", "bgr16", "rgba16", "bgra16", "mono16")


# The largest frame a CompressedImage may declare (8K UHD, 7680x4320, fits). A corrupt size field in a
# JPEG or PNG header, up to OpenCV's own limit of 2^30 pixels, made imdecode allocate the frame and
# fill what the data lacked with grey: a 1.4 kB JPEG claiming 30000x30000 took 5 GB and 15 s on the CPU.
MAX_COMPRESSED_PIXELS = 1 << 25
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15; 0xC4, 0xC8 and 0xCC are other segments),
# and the markers without a length field (TEM, RST0-7).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def compressed_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a PNG's IHDR or a JPEG's first frame header declares them, read without
    decoding; None for other data, or a JPEG without a frame header before its scan."""
    if data[:8] == _PNG_SIGNATURE:
        return tuple(struct.unpack_from(">II", data, 16)) if data[12:16] == b"IHDR" and len(data) >= 24 else None
    if data[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:  # bytes between segments: libjpeg skips them too (with a warning)
            offset = data.find(b"\xff", offset)
            if offset < 0:
                return None
            continue
        marker = data[offset + 1]
        if marker == 0xFF:  # fill bytes: go to the last one, before its marker
            offset = len(data) - len(data[offset + 1:].lstrip(b"\xff")) - 1
        elif marker in _JPEG_STANDALONE:
            offset += 2
        elif marker in _JPEG_SOF:
            if offset + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, offset + 5)
            return width, height
        elif marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        else:  # a segment with a length (APPn, DQT, DHT, ...), which counts its own two bytes
            offset += 2 + struct.unpack_from(">H", data, offset + 2)[0]
    return None


def stamp_to_seconds(stamp: Any) -> float:
    """builtin_interfaces/Time -> float seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


# CDR encapsulation identifiers (second byte; the first is 0) whose body starts at offset 4 with the
# message's first field: plain CDR (XCDR1, what ROS 2 RMWs write) and plain XCDR2, big / little endian.
_PLAIN_CDR_ENDIAN = {0x00: ">", 0x01: "<", 0x06: ">", 0x07: "<"}
_STAMP_FORMATS = {endian: struct.Struct(endian + "iI") for endian in "<>"}


def stamp_from_cdr(data: bytes) -> float:
    """`header.stamp` in seconds of a serialized message whose first field is a std_msgs/Header
    (Image, CompressedImage, JointState), read from its CDR bytes without deserializing them: 4
    bytes of encapsulation, then int32 sec and uint32 nanosec."""
    if len(data) < 12:
        raise ObservationError(f"malformed message: expected >= 12 serialized bytes (encapsulation and "
                               f"stamp), found {len(data)}")
    endian = _PLAIN_CDR_ENDIAN.get(data[1]) if data[0] == 0 else None
    if endian is None:
        raise ObservationError(f"unsupported serialization: expected plain CDR (encapsulation 0x0000, "
                               f"0x0001, 0x0006 or 0x0007), found 0x{bytes(data[:2]).hex()}")
    sec, nanosec = _STAMP_FORMATS[endian].unpack_from(data, 4)
    return sec + nanosec * 1e-9


def seconds_to_stamp(t_s: float) -> Time:
    sec, nanosec = split_seconds(t_s)
    return Time(sec=sec, nanosec=nanosec)


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8; any row padding) -> uint8 RGB [H, W, 3]."""
    encoding = msg.encoding
    if encoding not in IMAGE_ENCODINGS:
        raise ObservationError(f"unsupported image encoding: expected one of {sorted(IMAGE_ENCODINGS)}, found {echo(encoding)}")
    channels, conversion = IMAGE_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ObservationError(f"empty image: expected width and height > 0, found {width}x{height}")
    row_bytes = width * channels
    if step < row_bytes:
        raise ObservationError(
            f"image step too small: expected >= width*channels = {width}*{channels} = {row_bytes} bytes, found {step}")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * height:
        # Longer is refused too (as cv_bridge does): it is what a wrong encoding, width or height
        # looks like (e.g. rgba8 pixels labelled rgb8), and reading a prefix would scramble them.
        raise ObservationError(
            f"image data too {'short' if data.size < step * height else 'long'}: expected step*height = "
            f"{step}*{height} = {step * height} bytes, found {data.size}")
    # Rows may be padded to `step`; slice the padding off, then view as pixels.
    pixels = data.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if conversion is None:
        return pixels if step == row_bytes else np.ascontiguousarray(pixels)
    if channels == 1:
        pixels = pixels[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def compressed_image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG, as image_transport's `compressed` writes them) -> uint8 RGB [H, W, 3]."""
    fmt = str(msg.format)
    if "compresseddepth" in fmt.lower():
        raise ObservationError(f"unsupported compressed format: expected JPEG or PNG colour/mono, found {echo(fmt)}")
    # A format without ';' ("jpeg", "png", older publishers) names no source encoding: taken as sent.
    source = fmt.split(";", 1)[0].strip() if ";" in fmt else ""
    if source and source not in COMPRESSED_SOURCE_ENCODINGS:
        raise ObservationError(f"unsupported compressed image: expected a colour or mono source encoding "
                               f"{list(COMPRESSED_SOURCE_ENCODINGS)}, found {echo(source)} (format {echo(fmt)})")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ObservationError(f"empty compressed image (format {echo(fmt)}): expected JPEG or PNG bytes, found 0 bytes")
    size = compressed_frame_size(data.tobytes())
    if size is not None and size[0] * size[1] > MAX_COMPRESSED_PIXELS:
        raise ObservationError(
            f"cannot decode compressed image (format {echo(fmt)}): expected JPEG or PNG of at most "
            f"{MAX_COMPRESSED_PIXELS} pixels (8K UHD fits), found a header claiming {size[0]}x{size[1]} "
            f"in {data.size} bytes (a corrupt size field?)")
    # imdecode returns BGR whatever the format string says the source pixels were. EXIF orientation
    # is ignored, as image_transport's compressed subscriber and cv_bridge do: the pixels as sent.
    # OpenCV raises instead of returning None for some corrupt headers (a size over its pixel limit).
    # IMREAD_ANYDEPTH keeps a 16-bit PNG at 16 bits (IMREAD_COLOR alone cuts it to its high byte),
    # so that it can be refused below.
    refused = ""
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:
        bgr, refused = None, f" (OpenCV refused it: {getattr(exc, 'err', '') or exc})"
    if bgr is None or bgr.size == 0:
        raise ObservationError(
            f"cannot decode compressed image (format {echo(fmt)}): expected JPEG or PNG, found {data.size} "
            f"bytes starting {bytes(data[:4]).hex()}{refused}")
    if bgr.dtype != np.uint8:
        raise ObservationError(
            f"unsupported compressed image: expected 8 bits per channel (one of {sorted(IMAGE_ENCODINGS)} "
            f"compressed), found {bgr.dtype.itemsize * 8} bits per channel (format {echo(fmt)})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def joint_positions(msg: Any, joint_names: Sequence[str]) -> np.ndarray:
    """sensor_msgs/JointState -> float64 positions in `joint_names` order, matched by name."""
    names = list(msg.name)
    positions = msg.position
    if not names:
        raise ObservationError(f"empty joint_states: expected joints {list(joint_names)}, found no names")
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names):
        # Counted once (Counter): names.count per name took seconds for a message of 10000 names.
        duplicates = sorted(n for n, times in Counter(names).items() if times > 1)
        raise ObservationError(f"joint_states has duplicate names: expected each joint once, found {echo(duplicates)} repeated")
    if len(positions) != len(names):
        # Longer is refused too: JointState's arrays have one entry per name, and with extras which
        # value belongs to which joint is unknown.
        raise ObservationError(
            f"joint_states position too {'short' if len(positions) < len(names) else 'long'}: expected one "
            f"per name ({len(names)}), found {len(positions)}")
    missing = [n for n in joint_names if n not in index]
    if missing:
        raise ObservationError(f"joint_states lacks joints {missing}: expected all of {list(joint_names)}, found {echo(names)}")
    state = np.fromiter((positions[index[n]] for n in joint_names), dtype=np.float64, count=len(joint_names))
    if not np.all(np.isfinite(state)):
        bad = {n: float(v) for n, v in zip(joint_names, state) if not math.isfinite(v)}
        raise ObservationError(f"joint_states has non-finite positions: expected finite values, found {bad}")
    return state


_U32 = {endian: struct.Struct(endian + "I") for endian in "<>"}
_XCDR1_ENDIAN = {0x00: ">", 0x01: "<"}


def _align4(offset: int) -> int:
    return (offset + 3) & ~3


class ImageFields(NamedTuple):
    """What `image_to_rgb` reads of a sensor_msgs/Image; data: uint8 view of the serialized bytes."""

    height: int
    width: int
    encoding: str
    step: int
    data: np.ndarray


class CompressedImageFields(NamedTuple):
    """What `compressed_image_to_rgb` reads of a sensor_msgs/CompressedImage."""

    format: str
    data: np.ndarray


def image_fields_from_cdr(data: bytes, compressed: bool) -> ImageFields | CompressedImageFields | None:
    """The fields of a serialized Image (or CompressedImage), read in place: rclpy's deserializer
    takes ~0.19 ms for a 640x480 rgb8 frame, this ~10 us (2-core CPU machine), and copies nothing
    (the pixels are a read-only view of `data`). None where the bytes are not plain XCDR1 whose
    every field fits, or whose frame_id, encoding or format is not plain ASCII ended by one NUL: such a
    message must go through the deserializer, so that it is refused (or its strings read) exactly
    as before. Raises ObservationError for plain fields whose pixel data runs past the end of the
    bytes (a message cut short), which the deserializer refuses too.

    Layout after the 4-byte encapsulation, aligned from its end: stamp (int32, uint32), frame_id
    (uint32 length incl. NUL, chars); Image: height, width (uint32), encoding (string), is_bigendian
    (uint8), step (uint32), data (uint32 count, bytes); CompressedImage: format (string), data."""
    endian = _XCDR1_ENDIAN.get(data[1]) if len(data) >= 16 and data[0] == 0 and data[2:4] == b"\0\0" else None
    if endian is None:
        return None
    u32 = _U32[endian]
    # frame_id is not used, but one that is not plain goes to the deserializer too: read as before.
    frame_id, offset = _ascii_string(data, 12, u32)
    if frame_id is None:
        return None
    if compressed:
        fmt, offset = _ascii_string(data, offset, u32)
        if fmt is None:
            return None
    else:
        offset = _align4(offset)
        if offset + 8 > len(data):
            return None
        height, width = u32.unpack_from(data, offset)[0], u32.unpack_from(data, offset + 4)[0]
        encoding, offset = _ascii_string(data, offset + 8, u32)
        offset = _align4(offset + 1)  # is_bigendian
        if encoding is None or offset + 4 > len(data):
            return None
        (step,) = u32.unpack_from(data, offset)
        offset += 4
    offset = _align4(offset)
    if offset + 4 > len(data):
        return None
    (count,) = u32.unpack_from(data, offset)
    remaining = len(data) - offset - 4
    if count > remaining:
        # Every field before it read as the deserializer reads them, so it would refuse these bytes
        # too, after printing "sequence size exceeds remaining buffer" per frame and raising "error
        # not set": said here instead, with what it found.
        kind = "CompressedImage" if compressed else "Image"
        raise ObservationError(f"cannot deserialize {len(data)} bytes as {kind}: expected CDR of sensor_msgs/{kind}, "
                               f"found a data field of {count} bytes with {remaining} left (a message cut short?)")
    pixels = np.frombuffer(data, np.uint8, count=count, offset=offset + 4)
    return CompressedImageFields(fmt, pixels) if compressed else ImageFields(height, width, encoding, step, pixels)


def _ascii_string(data: bytes, offset: int, u32: struct.Struct) -> tuple[str | None, int]:
    """The CDR string at `offset` (aligned to 4 first) and the offset after it; None for one the
    deserializer may read otherwise (empty, not ended by exactly one NUL, not ASCII) or cut short."""
    offset = _align4(offset)
    if offset + 4 > len(data):
        return None, offset
    (length,) = u32.unpack_from(data, offset)
    end = offset + 4 + length
    raw = data[offset + 4:end - 1]
    if length == 0 or end > len(data) or data[end - 1] != 0 or not raw.isascii() or 0 in raw:
        return None, end
    return raw.decode("ascii"), end


class JointStateReader:
    """Serialized sensor_msgs/JointState (CDR bytes) -> float64 positions in `joint_names` order.

    The checks and error messages of `joint_positions`, at a fraction of its cost: building the
    Python message is most of what a JointState costs, and a 1 kHz joint_state_broadcaster sends
    the same names every time. The first message, and any whose names differ, is deserialized
    (`deserialize`: bytes -> JointState, rclpy's deserialize_message in the node) and mapped by
    `joint_positions`; its layout is kept: the bytes of its name list, alignment padding excluded
    (Fast-CDR leaves padding uninitialised), and where its positions follow. A later message whose
    name bytes match is read in place (positions as a numpy view). Anything else, other names, a
    position count other than the name count, a non-finite value, velocity or effort not fitting in
    the bytes, XCDR2, takes the full path, so that a bad message is refused with exactly the words of
    `joint_positions` or the deserializer.

    XCDR1 layout after the 4-byte encapsulation: stamp (8 bytes), frame_id (uint32 length incl. NUL,
    chars), name (uint32 count, then per name: padding to 4, uint32 length, chars), then position,
    velocity and effort, each: padding to 4, uint32 count, padding to 8 counted from the end of the
    encapsulation (none when the count is 0), float64 values. Fast-CDR may leave unused bytes after
    the last one.
    """

    def __init__(self, joint_names: Sequence[str], deserialize: Callable[[bytes], Any]) -> None:
        self._joint_names = tuple(joint_names)
        self._deserialize = deserialize
        self._layout: _NameLayout | None = None

    def positions(self, data: bytes) -> np.ndarray:
        if len(data) < 16:
            raise ObservationError(f"malformed joint_states: expected >= 16 serialized bytes, found {len(data)}")
        layout = self._layout
        if layout is not None:
            state = layout.read(data)
            if state is not None:
                return state
        try:
            msg = self._deserialize(data)
        except Exception as exc:  # noqa: BLE001 - the injected deserializer's own error type (rclpy: RMWError)
            raise ObservationError(f"cannot deserialize {len(data)} bytes as sensor_msgs/JointState ({exc})") from None
        state = joint_positions(msg, self._joint_names)
        self._layout = _NameLayout.of(data, list(msg.name), self._joint_names)
        return state


class _NameLayout:
    """Where a known name list sits in a JointState's bytes, and how its positions map to our joints."""

    def __init__(self, encapsulation: bytes, name_bytes: np.ndarray, kept: np.ndarray, name_count: int,
                 index: np.ndarray) -> None:
        self._encapsulation = encapsulation  # XCDR1, one byte order: XCDR2 aligns float64 to 4, not 8
        endian = _XCDR1_ENDIAN[encapsulation[1]]
        self._u32 = _U32[endian]
        self._dtype = np.dtype(endian + "f8")
        self._name_bytes = name_bytes  # the name list's bytes, padding included
        self._kept = kept  # offsets of its non-padding bytes
        self._expected = name_bytes[kept].tobytes()
        self._name_count = name_count
        self._index = index  # message position of each of our joints

    @classmethod
    def of(cls, data: bytes, names: list[str], joint_names: tuple[str, ...]) -> "_NameLayout | None":
        """The layout of a message `joint_positions` accepted (names unique, ours all present)."""
        endian = _XCDR1_ENDIAN.get(data[1]) if data[0] == 0 else None
        if endian is None:
            return None
        u32 = _U32[endian]
        start = cls._names_start(data, u32)
        kept = list(range(start, start + 4))
        offset = start + 4
        (name_count,) = u32.unpack_from(data, start)
        for _ in range(name_count):
            offset = _align4(offset)
            (length,) = u32.unpack_from(data, offset)
            kept.extend(range(offset, offset + 4 + length))
            offset += 4 + length
        name_bytes = np.frombuffer(data, np.uint8, count=offset - start, offset=start).copy()
        index = np.array([names.index(n) for n in joint_names], dtype=np.intp)
        return cls(bytes(data[:2]), name_bytes, np.array(kept, dtype=np.intp) - start, name_count, index)

    @staticmethod
    def _names_start(data: bytes, u32: struct.Struct) -> int:
        (frame_id_length,) = u32.unpack_from(data, 12)
        return _align4(16 + frame_id_length)

    def read(self, data: bytes) -> np.ndarray | None:
        """The positions if `data` has exactly these names, finite values for our joints, and its
        velocity and effort within its bytes, else None."""
        if data[:2] != self._encapsulation:
            return None
        start = self._names_start(data, self._u32)
        end = start + len(self._name_bytes)
        if len(data) < _align4(end) + 4:  # the name list and the position count
            return None
        names = np.frombuffer(data, np.uint8, count=len(self._name_bytes), offset=start)
        if names[self._kept].tobytes() != self._expected:
            return None
        positions = self._float64_sequence(data, end)
        if positions is None or positions[1] != self._name_count:
            return None
        first, count, positions_end = positions
        # The deserializer refuses a message cut short in velocity or effort; so must this path.
        velocity = self._float64_sequence(data, positions_end)
        if velocity is None or self._float64_sequence(data, velocity[2]) is None:
            return None
        state = np.frombuffer(data, self._dtype, count=count, offset=first)[self._index].astype(np.float64)
        return state if np.isfinite(state).all() else None

    def _float64_sequence(self, data: bytes, offset: int) -> tuple[int, int, int] | None:
        """The float64 sequence after `offset` as (first value's offset, count, end), or None if it
        does not fit in `data`."""
        count_at = _align4(offset)
        if len(data) < count_at + 4:
            return None
        (count,) = self._u32.unpack_from(data, count_at)
        first = count_at + 4
        if count:
            # float64 aligns to 8 from the end of the encapsulation (0 or 4 bytes of padding); Fast-CDR
            # (and rosbags) align no values of an empty sequence: the next count follows at once.
            first += (first - 4) % 8
        end = first + count * 8
        return (first, count, end) if end <= len(data) else None


def trajectory_message(plan: TrajectoryPlan, joint_names: Sequence[str]) -> JointTrajectory:
    """A JointTrajectory for joint_trajectory_controller: header stamp zero (start on receipt)."""
    if plan.positions.shape[1] != len(joint_names):
        raise Pi0PolicyError(f"expected {len(joint_names)} action dims for joints {list(joint_names)}, "
                         f"found {plan.positions.shape[1]}")
    msg = JointTrajectory()
    msg.joint_names = list(joint_names)
    points = []
    for t_s, q, v in zip(plan.times_from_start_s.tolist(), plan.positions.tolist(), plan.velocities.tolist()):
        # Into the point's own Duration: the constructor builds one whether given one or not (a
        # tenth of the message's cost for a 50-action chunk).
        point = JointTrajectoryPoint(positions=q, velocities=v)
        time_from_start = point.time_from_start
        time_from_start.sec, time_from_start.nanosec = split_seconds(t_s)
        points.append(point)
    msg.points = points
    return msg


def action_chunk_message(actions: np.ndarray) -> Float32MultiArray:
    """[H, A] -> Float32MultiArray (dims horizon, action; row-major; data_offset 0)."""
    horizon, action_dim = actions.shape
    msg = Float32MultiArray()
    msg.layout.dim = [
        MultiArrayDimension(label="horizon", size=horizon, stride=horizon * action_dim),
        MultiArrayDimension(label="action", size=action_dim, stride=action_dim),
    ]
    msg.layout.data_offset = 0
    msg.data = array.array("f", np.ascontiguousarray(actions, dtype=np.float32).tobytes())
    return msg


def action_chunk_from_message(msg: Any) -> np.ndarray:
    """The inverse of `action_chunk_message`, for subscribers and tests."""
    dims = list(msg.layout.dim)
    if [d.label for d in dims] != ["horizon", "action"]:
        raise ObservationError(f"expected dims ['horizon', 'action'], found {echo([d.label for d in dims])}")
    horizon, action_dim = dims[0].size, dims[1].size
    data = np.asarray(msg.data, dtype=np.float32)[msg.layout.data_offset:]
    if data.size != horizon * action_dim:
        raise ObservationError(f"expected {horizon}*{action_dim} values, found {data.size}")
    return data.reshape(horizon, action_dim)
